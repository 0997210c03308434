"""Early-stopped self-consistency on SmolLM2-135M-Instruct answering `mathematics-dataset` problems.

Reads the recorded checkpoint (benchmarks/data/sampling_math.jsonl, N = 16 samples per problem,
recorded by benchmarks/record_sampling.py; whatever part of it exists: see ``n_problems``) and
compares, on held-out problems, fixed-N majority vote, ESC, Adaptive-Consistency (Beta and
Dirichlet), DSC, first-finish, confidence stop and stopwise's certified stop (vote_settled with λ
certified by Learn-then-Test on a random calibration split). Rules are evaluated offline on the
trace, which decides exactly as the online sampler (tested in tests/test_sampling.py).
DSC's batch allocation of one total budget across the held-out problems (DifficultyAllocator) is
run on a ReplayBackend that serves each problem's recorded samples in recorded order, at a few
total budgets, beside the per-question vote_settled rule at the same spend ("dsc_allocator").
DEER is measured on the smaller full-thinking recording benchmarks/data/sampling_deer.jsonl.

    PYTHONPATH=src python benchmarks/sampling.py --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from stopwise import CalibrationError, Signal, Trace, calibrate, hash_answers  # noqa: E402
from stopwise.calibrate import table as stopwise_table  # noqa: E402
from stopwise.rules.base import halts_from_z  # noqa: E402
from stopwise.sampling.allocate import DifficultyAllocator  # noqa: E402
from stopwise.sampling.backends import ReplayBackend  # noqa: E402
from stopwise.sampling.certify import certify  # noqa: E402
from stopwise.sampling.data import Question  # noqa: E402
from stopwise.sampling.deer import deer_trace, result_from_json  # noqa: E402
from stopwise.sampling.extract import NumberExtractor  # noqa: E402
from stopwise.sampling.record import read_checkpoint, trace_from_records  # noqa: E402
from stopwise.sampling.rules import _counts, sampling_rule  # noqa: E402

CHECKPOINT = HERE / "data" / "sampling_math.jsonl"
DEER_CHECKPOINT = HERE / "data" / "sampling_deer.jsonl"
CERTIFICATE = HERE / "data" / "sampling_certificate.json"
N = 16
BASELINES = ("esc", "asc", "dirichlet", "dsc", "first_finish", "confidence")
#: Total budgets of the DSC allocator besides the certified rule's spend, as fractions of fixed N.
ALLOCATOR_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def measure(trace: Trace, halts: np.ndarray) -> dict[str, float]:
    full_acc = float((trace.reference == trace.labels).mean())
    pred = trace.predictions_at(halts)
    acc = float((pred == trace.labels).mean())
    samples = float((halts + 1).mean())
    return {
        "samples_fraction": samples / trace.n_stages,
        "samples_saved_fraction": 1.0 - samples / trace.n_stages,
        "tokens_fraction": float(trace.cost_at(halts).mean() / trace.full_cost.mean()),
        "accuracy": acc,
        "accuracy_drop_points": 100.0 * (full_acc - acc),
        "agreement_with_full_vote": float((pred == trace.reference).mean()),
    }


def oracle_halts(trace: Trace) -> np.ndarray:
    """Earliest stage whose running vote equals the N-sample vote and stays equal."""
    differs = trace.predictions != trace.reference[:, None]
    last_diff = np.where(differs.any(axis=1), trace.n_stages - 1 - np.argmax(differs[:, ::-1], axis=1), -1)
    return (last_diff + 1).astype(np.int64)


def certified_run(cal: Trace, test: Trace, *, epsilon: float, delta: float, risk: str,
                  save: Path | None = None) -> dict[str, Any]:
    try:
        cert = certify(cal, epsilon=epsilon, delta=delta, risk=risk)
        if save is not None:
            cert.save(save)
    except CalibrationError as exc:  # a partial recording may be too small to certify anything
        out = measure(test, np.full(test.n, test.n_stages - 1))
        out.update({"certified": False, "lam": None, "epsilon": epsilon, "delta": delta, "risk": risk,
                    "certified_test_risk": 0.0, "calibration_risk": None, "error": str(exc)})
        return out
    rule = cert.make_rule()
    halts = rule.halts(test)
    out = measure(test, halts)
    check = cert.check(test)
    out.update({"certified": cert.certified, "lam": cert.lam, "epsilon": epsilon, "delta": delta, "risk": risk,
                "certified_test_risk": check["risk"], "calibration_risk": cert.empirical_risk})
    return out


def sampling_report(trace: Trace, *, epsilon: float, delta: float, acc_epsilon: float, seed: int,
                    repeats: int, certificate: Path = CERTIFICATE) -> dict[str, Any]:
    cal, test = trace.split(0.5, seed=seed)
    oracle = measure(test, oracle_halts(test))
    methods: dict[str, Any] = {"fixed_n": measure(test, np.full(test.n, test.n_stages - 1))}
    for name in BASELINES + ("settled",):
        methods[name if name != "settled" else "settled_default_lam"] = measure(
            test, sampling_rule(name, max_samples=test.n_stages).halts(test))
    cert = certified_run(cal, test, epsilon=epsilon, delta=delta, risk="gap", save=certificate)
    methods["certified"] = cert
    methods["certified_eps_0.1"] = certified_run(cal, test, epsilon=0.1, delta=delta, risk="gap")
    cert_acc = certified_run(cal, test, epsilon=acc_epsilon, delta=delta, risk="accuracy_drop")
    methods["certified_accuracy_drop"] = cert_acc
    # Repeated random splits: how often the certified gap risk exceeds ε on the test half.
    risks, saved = [], []
    for r in range(repeats):
        c, t = trace.split(0.5, seed=1000 + r)
        res = certified_run(c, t, epsilon=epsilon, delta=delta, risk="gap")
        risks.append(res["certified_test_risk"])
        saved.append(res["samples_saved_fraction"])
    base = {k: v for k, v in methods.items() if k in BASELINES}
    best = max(base, key=lambda k: base[k]["samples_saved_fraction"])
    good = {k: v for k, v in base.items() if v["accuracy_drop_points"] <= 0.5}
    best_good = max(good, key=lambda k: good[k]["samples_saved_fraction"]) if good else None
    return {
        "n_problems": trace.n,
        "n_samples": trace.n_stages,
        "n_calibration": cal.n,
        "n_test": test.n,
        "full_vote_accuracy": float((test.reference == test.labels).mean()),
        "single_sample_accuracy": float((test.predictions[:, 0] == test.labels).mean()),
        "no_answer_sample_rate": float((trace.signals["sample"] < 0).mean()),
        "samples_saved_fraction": cert["samples_saved_fraction"],
        "tokens_saved_fraction": 1.0 - cert["tokens_fraction"],
        "oracle_saved_fraction": oracle["samples_saved_fraction"],
        "saved_vs_oracle": cert["samples_saved_fraction"] / max(oracle["samples_saved_fraction"], 1e-12),
        "accuracy_drop_points": cert["accuracy_drop_points"],
        "certified_test_risk": cert["certified_test_risk"],
        "epsilon": epsilon,
        "delta": delta,
        "lam": cert["lam"],
        "certified": cert["certified"],
        "certificate": _shown(certificate) if cert["certified"] else None,
        "best_baseline": best,
        "best_baseline_saved_fraction": base[best]["samples_saved_fraction"],
        "best_baseline_accuracy_drop_points": base[best]["accuracy_drop_points"],
        "best_baseline_within_half_point": best_good,
        "best_baseline_within_half_point_saved_fraction": None if best_good is None else good[best_good]["samples_saved_fraction"],
        # The guarantee bounds the population risk; a test half of ~n/2 problems is a noisy
        # estimate of it, so its empirical risk exceeds ε more often than δ even when the bound holds.
        "repeated_splits": {"repeats": repeats, "mean_test_risk": float(np.mean(risks)),
                            "max_test_risk": float(np.max(risks)),
                            "test_half_risk_above_epsilon_rate": float(np.mean(np.asarray(risks) > epsilon)),
                            "mean_samples_saved_fraction": float(np.mean(saved))},
        "methods": methods,
        "hindsight": hindsight_report(cal, test, epsilon=epsilon),
    }


def _count_cells(trace: Trace) -> list[list[tuple[int, int, int]]]:
    """Per problem and sample k: (k, the running leader's count, the runner-up's count)."""
    codes = trace.signals["sample"].astype(np.int64)
    columns = []
    for k in range(trace.n_stages):
        top = np.pad(_counts(codes[:, : k + 1]), ((0, 0), (0, 1)))  # a runner-up of 0 after one sample
        columns.append([(k, int(a), int(b)) for a, b in top[:, :2]])
    return [list(cells) for cells in zip(*columns, strict=True)]


def hindsight_report(cal: Trace, test: Trace, *, epsilon: float) -> dict[str, Any]:
    """How far rules that see only the votes get on the test half when their threshold is chosen
    on the test half itself (hindsight, no guarantee): a ceiling on what certifying can reach.

    - ``vote_settled``: the certified family at the λ that saves most with test gap <= ε;
    - ``count_cells``: a rule learned on the calibration half: the share of calibration problems
      whose running vote at a cell (k, leader's count, runner-up's count) already equals their
      N-sample vote and stays equal (a count-based estimate of P(settled | votes)), thresholded.
    """
    oracle = measure(test, oracle_halts(test))["samples_saved_fraction"]
    tab = stopwise_table(test, sampling_rule("settled", max_samples=test.n_stages), "gap")
    ok = tab.risk <= epsilon + 1e-12
    settled = float(1.0 - tab.mean_stages[ok].min() / test.n_stages) if ok.any() else 0.0
    stable = np.arange(cal.n_stages)[None, :] >= oracle_halts(cal)[:, None]
    hits: dict[tuple[int, int, int], float] = {}
    seen: dict[tuple[int, int, int], int] = {}
    for i, cells in enumerate(_count_cells(cal)):
        for k, cell in enumerate(cells):
            hits[cell] = hits.get(cell, 0.0) + float(stable[i, k])
            seen[cell] = seen.get(cell, 0) + 1
    # One pseudo-count towards "not settled": a cell seen once does not decide on its own.
    score = np.array([[hits.get(c, 0.0) / (seen.get(c, 0) + 1) for c in cells] for cells in _count_cells(test)])
    # "Stop at the first score >= t": the t that saves most with test gap <= ε.
    halts = [halts_from_z(score, test.lengths, float(t)) for t in np.unique(score)]
    cells = max((measure(test, h)["samples_saved_fraction"] for h in halts
                 if float((test.predictions_at(h) != test.reference).mean()) <= epsilon), default=0.0)
    return {"epsilon": epsilon, "oracle_saved_fraction": oracle,
            "vote_settled_saved_fraction": settled, "vote_settled_vs_oracle": settled / max(oracle, 1e-12),
            "count_cells_saved_fraction": cells, "count_cells_vs_oracle": cells / max(oracle, 1e-12)}


def rule_at_budget(test: Trace, z: np.ndarray, budget: int) -> tuple[float, np.ndarray, int | None]:
    """The largest λ of a rule (statistic ``z`` on ``test``) whose test spend fits ``budget``
    samples, its halts, and the next larger spend any λ gives (None: none). λ runs over the
    statistic's values up to 1; spend grows with λ."""
    lams = np.unique(z[np.isfinite(z) & (z <= 1.0)])
    best: tuple[float, np.ndarray] | None = None
    over = None
    for lam in lams:  # ascending: keep the last that fits
        halts = halts_from_z(z, test.lengths, float(lam))
        if int((halts + 1).sum()) > budget:
            over = int((halts + 1).sum())
            break
        best = (float(lam), halts)
    if best is None:
        raise ValueError(f"No λ of the rule spends at most {budget} samples on {test.n} problems.")
    return best[0], best[1], over


def allocator_report(trace: Trace, rows: list[dict[str, Any]], *, seed: int, cert_lam: float | None,
                     pre: int = 3, window: int = 4, lam: float = 0.95) -> dict[str, Any]:
    """DSC's batch allocation (DifficultyAllocator) over the test half of ``sampling_report``'s
    split, replaying each problem's recorded samples in order, at a few total budgets; beside it
    the per-question vote_settled rule (the certified family) at the same spend."""
    _, test_rows = trace.split_rows(0.5, seed=seed)
    test = trace[test_rows]
    records = [rows[i] for i in test_rows]
    questions = [Question(id=str(r["id"]), prompt=r["prompt"], label=r.get("label")) for r in records]
    full = N * test.n
    full_acc = float((test.reference == test.labels).mean())
    rule = sampling_rule("settled", max_samples=N)
    z = rule.z(test)
    budgets: dict[str, int] = {}
    if cert_lam is not None:
        budgets["certified_spend"] = int((rule.halts(test, lam=cert_lam) + 1).sum())
    for f in ALLOCATOR_FRACTIONS:
        budgets[f"fixed_n_{round(100 * f)}pct"] = int(round(f * full))
    out: dict[str, Any] = {
        "what": ("DifficultyAllocator (DSC batch allocation: pre-samples, unanimous settled, hardest first in "
                 "difficulty-sized windows, Beta stop) over the test problems, replaying recorded samples in order"),
        "n_test": test.n,
        "settings": {"pre": pre, "window": window, "lam": lam, "max_samples": N, "vote": "majority"},
        "per_question_rule": ("vote_settled (the certified family): the certified λ at certified_spend; elsewhere the "
                              "largest λ whose spend on these test problems fits the budget (chosen on the test "
                              "problems themselves, so not certified)"),
        "budgets": {},
    }
    for name, total in budgets.items():
        backend = ReplayBackend.from_records(records)
        alloc = DifficultyAllocator(backend, total_samples=total, pre=pre, max_samples=N, window=window,
                                    lam=lam, extract="number").run(questions)
        used = np.asarray([r.n_samples for r in alloc.results])
        pred = hash_answers([r.answer for r in alloc.results])
        # The replay serves each problem's samples in recorded order, so every answer is the trace's
        # running vote after the same number of samples.
        assert np.array_equal(pred, test.predictions_at(used - 1)), "replay disagrees with the recorded trace"
        assert alloc.spent == int(used.sum()) == sum(backend.served.values()) <= total
        acc = float((pred == test.labels).mean())
        entry: dict[str, Any] = {
            "total_samples": total,
            "budget_fraction_of_fixed_n": total / full,
            "spent": alloc.spent,
            "budget_used_fraction": alloc.spent / total,
            "samples_fraction": alloc.spent / full,
            "samples_saved_fraction": 1.0 - alloc.spent / full,
            "tokens_fraction": float(sum(r.n_tokens for r in alloc.results) / test.full_cost.sum()),
            "accuracy": acc,
            "accuracy_drop_points": 100.0 * (full_acc - acc),
            "agreement_with_full_vote": float((pred == test.reference).mean()),
            "rounds": alloc.rounds,
            "max_samples_one_problem": int(used.max()),
            "reasons": alloc.summary()["reasons"],
        }
        over = None
        if name == "certified_spend":
            assert cert_lam is not None
            rule_lam, halts = cert_lam, rule.halts(test, lam=cert_lam)
        else:
            rule_lam, halts, over = rule_at_budget(test, z, total)
        per_q = measure(test, halts)
        entry["per_question_rule"] = {"lam": rule_lam, "certified": name == "certified_spend",
                                      "spent": int((halts + 1).sum()), **per_q}
        if int((halts + 1).sum()) < 0.9 * total:
            entry["per_question_rule"]["note"] = (f"no λ spends between {int((halts + 1).sum())} and {over} samples: "
                                                  "the rule cannot use this budget")
        entry["allocator_minus_rule_accuracy_points"] = 100.0 * (acc - per_q["accuracy"])
        entry["allocator_minus_rule_agreement"] = entry["agreement_with_full_vote"] - per_q["agreement_with_full_vote"]
        out["budgets"][name] = entry
    return out


def deer_report(path: Path, *, lam: float, score: str, deer_epsilon: float = 0.2) -> dict[str, Any]:
    header, rows = read_checkpoint(path)
    if not rows:
        return {"deer_n_problems": 0, "note": f"no DEER recording at {path}"}
    # Re-read trial answers from the stored text with the current extractor.
    results = [result_from_json(r, extract=NumberExtractor(markers=("=",))) for r in rows]
    trace = deer_trace(results, labels=[r.get("label") for r in rows])
    rule = Signal(signal=f"deer_{score}", lam=lam)
    halts = rule.halts(trace)
    full_acc = float((trace.reference == trace.labels).mean())
    acc = float((trace.predictions_at(halts) == trace.labels).mean())
    out: dict[str, Any] = {
        "deer_n_problems": trace.n,
        "deer_settings": {k: header.get(k) for k in ("max_think_tokens", "trial_tokens", "transitions")} if header else {},
        "deer_lam_paper": lam,
        "deer_score": score,
        "deer_tokens_saved_fraction": float(1.0 - trace.cost_at(halts).mean() / trace.full_cost.mean()),
        "deer_accuracy_full_thinking": full_acc,
        "deer_paper_lam_accuracy": acc,
        "deer_accuracy_change_points": 100.0 * (acc - full_acc),
        "deer_paper_lam_agreement_with_full_thinking": float((trace.predictions_at(halts) == trace.reference).mean()),
        "deer_mean_transitions": float(trace.lengths.mean() - 1),
    }
    curve = []
    for lam_i in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
        h = Signal(signal=f"deer_{score}", lam=lam_i).halts(trace)
        curve.append({"lam": lam_i, "tokens_saved_fraction": float(1.0 - trace.cost_at(h).mean() / trace.full_cost.mean()),
                      "accuracy_change_points": 100.0 * (float((trace.predictions_at(h) == trace.labels).mean()) - full_acc),
                      "agreement_with_full_thinking": float((trace.predictions_at(h) == trace.reference).mean())})
    out["deer_curve"] = curve
    # λ certified the same way as for sampling (LTT, gap = answer differs from full thinking's),
    # on a random half, measured on the other half. Few problems: a loose ε.
    if trace.n >= 24:
        cal, test = trace.split(0.5, seed=0)
        for method in ("ltt", "crc"):
            cert = calibrate(cal, Signal(signal=f"deer_{score}"), epsilon=deer_epsilon, delta=0.1, method=method, risk="gap")
            h = cert.make_rule().halts(test)
            t_full = float((test.reference == test.labels).mean())
            out[f"deer_certified_{method}"] = {
                "epsilon": deer_epsilon, "certified": cert.certified, "lam": cert.lam, "n_calibration": cal.n, "n_test": test.n,
                "test_tokens_saved_fraction": float(1.0 - test.cost_at(h).mean() / test.full_cost.mean()),
                "test_gap_risk": float((test.predictions_at(h) != test.reference).mean()),
                "test_accuracy_change_points": 100.0 * (float((test.predictions_at(h) == test.labels).mean()) - t_full),
            }
    ltt = out.get("deer_certified_ltt")
    if ltt is not None and ltt["certified"]:
        # Headline: the certified λ on held-out problems; the paper's fixed λ stays under deer_paper_lam_*.
        out["deer_paper_lam_tokens_saved_fraction"] = out["deer_tokens_saved_fraction"]
        out["deer_paper_lam_accuracy_change_points"] = out["deer_accuracy_change_points"]
        out["deer_tokens_saved_fraction"] = ltt["test_tokens_saved_fraction"]
        out["deer_accuracy_change_points"] = ltt["test_accuracy_change_points"]
        out["deer_headline"] = f"certified λ (LTT, gap ε = {deer_epsilon}) on {ltt['n_test']} held-out problems"
    else:
        out["deer_headline"] = f"fixed λ = {lam} (paper default) on all {trace.n} problems"
    return out


def _shown(path: Path) -> str:
    """A path inside the repository relative to its root (results stay the same on every checkout)."""
    try:
        return str(path.resolve().relative_to(HERE.parent))
    except ValueError:
        return str(path)


def _certificate_for(checkpoint: Path) -> Path:
    """The committed recording's certificate keeps its name; another recording's sits beside it."""
    if checkpoint.resolve() == CHECKPOINT:
        return CERTIFICATE
    return checkpoint.with_name(checkpoint.stem + "_certificate.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--epsilon", type=float, default=0.05, help="gap risk level (vs the N-sample vote)")
    parser.add_argument("--acc-epsilon", type=float, default=0.03, help="accuracy-drop risk level")
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--deer-lam", type=float, default=0.95)
    parser.add_argument("--deer-score", default="mean")
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT,
                        help="recorded samples (benchmarks/record_sampling.py; default: the committed T = 0.7 recording)")
    parser.add_argument("--certificate", type=Path, default=None,
                        help="where the certificate is written (default: beside the committed recording)")
    args = parser.parse_args(argv)
    header, rows = read_checkpoint(args.checkpoint)
    rows = [r for r in rows if len(r["samples"]) == N]
    if not rows:
        print(f"No recorded problems in {args.checkpoint}: run benchmarks/record_sampling.py first.", file=sys.stderr)
        return 1
    # Answers are re-extracted from the stored completions with the current extractor.
    trace = trace_from_records(rows, header=header, n_samples=N, extract="number")
    report: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (bundled, fp32 CPU)",
        "data": "mathematics-dataset train-easy: arithmetic add_or_sub, add_sub_multiple, mul, div; algebra linear_1d",
        "recording": {k: header.get(k) for k in ("n", "temperature", "max_tokens", "seed")} if header else {},
        "complete": len(rows) >= 200,
    }
    report.update(sampling_report(trace, epsilon=args.epsilon, delta=args.delta, acc_epsilon=args.acc_epsilon,
                                  seed=args.seed, repeats=args.repeats,
                                  certificate=args.certificate or _certificate_for(args.checkpoint)))
    report.update(deer_report(DEER_CHECKPOINT, lam=args.deer_lam, score=args.deer_score))
    report["dsc_allocator"] = allocator_report(trace, rows, seed=args.seed,
                                               cert_lam=report["lam"] if report["certified"] else None)
    if args.json:
        print(json.dumps(report, indent=2, default=float))
    else:
        for key, value in report.items():
            if key not in ("methods", "dsc_allocator"):
                print(f"{key}: {value}")
        for name, m in report["methods"].items():
            print(f"  {name:24s} samples {m['samples_fraction']:.3f} tokens {m['tokens_fraction']:.3f} "
                  f"acc {m['accuracy']:.3f} drop {m['accuracy_drop_points']:+.2f} pts agree {m['agreement_with_full_vote']:.3f}")
        print(f"dsc_allocator on {report['dsc_allocator']['n_test']} test problems (vs vote_settled at the same spend):")
        for name, b in report["dsc_allocator"]["budgets"].items():
            r = b["per_question_rule"]
            print(f"  {name:24s} budget {b['budget_fraction_of_fixed_n']:.3f} samples {b['samples_fraction']:.3f} "
                  f"acc {b['accuracy']:.3f} drop {b['accuracy_drop_points']:+.2f} pts agree {b['agreement_with_full_vote']:.3f} "
                  f"{b['reasons']} | rule λ {r['lam']:.3f} samples {r['samples_fraction']:.3f} acc {r['accuracy']:.3f} "
                  f"agree {r['agreement_with_full_vote']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
