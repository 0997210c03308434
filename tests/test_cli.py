from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stopwise.cli import main
from stopwise.synthetic import synthetic_trace


@pytest.fixture()
def trace_file(tmp_path):
    return synthetic_trace(2000, seed=4, with_loss=True).save(tmp_path / "trace.npz")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_rules_lists_every_rule_as_json(capsys) -> None:
    code, out, _ = run(capsys, "rules", "--json")
    assert code == 0
    names = {r["name"] for r in json.loads(out)["rules"]}
    assert {"max_prob", "entropy", "patience", "esc", "beta", "betting", "budget"} <= names


def test_calibrate_then_check(capsys, trace_file, tmp_path) -> None:
    cert_path = tmp_path / "cert.json"
    code, out, _ = run(capsys, "calibrate", str(trace_file), "--rule", "max_prob", "--epsilon", "0.05",
                       "--delta", "0.1", "--json", "-o", str(cert_path))
    assert code == 0
    data = json.loads(out)
    assert data["certified"] and data["epsilon"] == 0.05 and cert_path.is_file()
    # Same distribution, new draw: within ε.
    fresh = synthetic_trace(3000, seed=5).save(tmp_path / "fresh.npz")
    code, out, _ = run(capsys, "check", str(cert_path), str(fresh), "--json")
    assert code == 0 and json.loads(out)["within_epsilon"]
    # A shifted distribution (much harder inputs) breaks the promise, and check says so.
    shifted = synthetic_trace(3000, seed=6, signal=0.8).save(tmp_path / "shift.npz")
    code, out, _ = run(capsys, "check", str(cert_path), str(shifted))
    assert code == 1 and out.startswith("VIOLATED")


def test_calibrate_with_rule_params_and_text_output(capsys, trace_file) -> None:
    code, out, _ = run(capsys, "calibrate", str(trace_file), "--rule", "entropy", "--param", "normalized=true",
                       "--epsilon", "0.05", "--pvalue", "hoeffding_bentkus", "--fwer", "holm")
    assert code == 0 and "certified λ" in out and "entropy" in out


def test_report_writes_json_and_png(capsys, trace_file, tmp_path) -> None:
    png, js = tmp_path / "p.png", tmp_path / "r.json"
    code, out, _ = run(capsys, "report", str(trace_file), "--rules", "max_prob,patience", "--epsilon", "0.05",
                       "--plot", str(png), "-o", str(js))
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    report = json.loads(js.read_text())
    assert [r["rule"] for r in report["rules"]] == ["MaxProb()", "Patience()"]
    assert report["oracle"]["mean_stages"] < report["n_stages"]
    assert all(r["certified"]["certified"] for r in report["rules"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["calibrate", "{trace}", "--rule", "nope", "--epsilon", "0.05"], "Unknown rule 'nope'"),
        (["calibrate", "{trace}", "--rule", "max_prob", "--epsilon", "1.5"], "'epsilon' parameter"),
        (["calibrate", "{trace}", "--rule", "max_prob", "--epsilon", "0.05", "--risk", "bleu"], "Unknown risk 'bleu'"),
        (["calibrate", "{trace}", "--rule", "esc", "--param", "window", "--epsilon", "0.05"], "NAME=VALUE"),
        (["calibrate", "{missing}", "--rule", "max_prob", "--epsilon", "0.05"], "does not exist"),
        (["check", "{trace}", "{trace}"], "invalid JSON"),
        (["info", "{notrace}"], "not a readable stopwise trace"),
    ],
)
def test_errors_are_one_line_and_exit_2(capsys, trace_file, tmp_path, argv, message) -> None:
    notrace = tmp_path / "x.npz"
    notrace.write_text("not a zip")
    fmt = {"trace": str(trace_file), "missing": str(tmp_path / "none.npz"), "notrace": str(notrace)}
    code, _, err = run(capsys, *[a.format(**fmt) for a in argv])
    assert code == 2
    assert err.startswith("stopwise: error:") and message in err


def test_console_script_runs_as_a_module(trace_file) -> None:
    proc = subprocess.run([sys.executable, "-m", "stopwise.cli", "info", str(trace_file), "--json"],
                          capture_output=True, text=True, check=True)
    info = json.loads(proc.stdout)
    assert info["n"] == 2000 and info["has_probs"] and info["signals"] == ["loss"]


def test_import_stopwise_does_not_import_torch() -> None:
    code = "import sys, stopwise, stopwise.cli, stopwise.report; stopwise.cli.build_parser(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


def test_selective_and_loss_risks_from_the_cli(capsys, trace_file) -> None:
    code, out, _ = run(capsys, "calibrate", str(trace_file), "--rule", "max_prob", "--epsilon", "0.05",
                       "--risk", "loss", "--risk-param", "signal=loss", "--json")
    assert code == 0 and json.loads(out)["risk"]["name"] == "loss"
    code, out, _ = run(capsys, "calibrate", str(trace_file), "--rule", "margin", "--epsilon", "0.05",
                       "--risk", "selective", "--fwer", "holm", "--json")
    assert code == 0 and json.loads(out)["pvalue"] == "binomial"



@pytest.mark.parametrize("mode", ["bootstrap", "split"])
def test_validate_repeats_calibration_and_reports_the_violation_share(capsys, trace_file, mode: str) -> None:
    code, out, _ = run(capsys, "validate", str(trace_file), "--rule", "max_prob", "--epsilon", "0.05",
                       "--repeats", "40", "--n-cal", "1000", "--mode", mode, "--json")
    summary = json.loads(out)
    assert code == 0 and summary["valid"] and summary["repeats"] == 40 and summary["mode"] == mode
    assert summary["violation_rate"] <= summary["allowance"]
    code, _, err = run(capsys, "validate", str(trace_file), "--rule", "max_prob", "--epsilon", "0.05", "--mode", "kfold")
    assert code == 2 and "'--mode' option" in err and "'bootstrap'" in err
    code, _, err = run(capsys, "validate", str(trace_file), "--rule", "max_prob", "--epsilon", "0.05", "--n-cal", "5000")
    assert code == 2 and "'--n-cal' option" in err
