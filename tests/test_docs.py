"""The README stays short and the docs stay true: generated pages match their JSONs, links resolve."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _generator(name: str = "gen_benchmarks") -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _generator()


def test_committed_benchmark_pages_match_their_json(tmp_path: Path) -> None:
    gen.render(RESULTS, tmp_path, plots=False)
    fresh = {p.name: p.read_text() for p in tmp_path.glob("*.md")}
    committed = {p.name: p.read_text() for p in (DOCS / "benchmarks").glob("*.md")}
    assert sorted(fresh) == sorted(committed), "run `python docs/gen_benchmarks.py` (or `make docs`)"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"pages out of date with benchmarks/results: {stale}; run `python docs/gen_benchmarks.py`"
    assert len(fresh) == len(list(RESULTS.glob("*.json"))) + 1  # one page per JSON, plus the index


def test_committed_cli_reference_matches_the_parser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")  # restored after the test: render() pins it for argparse
    fresh = _generator("gen_cli").render(tmp_path / "cli-reference.md").read_text()
    assert fresh == (DOCS / "cli-reference.md").read_text(), "run `python docs/gen_cli.py` (or `make docs`)"
    for command in ("stopwise calibrate", "stopwise check", "stopwise validate", "stopwise encoder predict"):
        assert f"## `{command}`" in fresh
    assert "--epsilon" in fresh


def test_page_shows_a_changed_figure(tmp_path: Path) -> None:
    # A page that did not follow its JSON would let a stale figure through: change one, re-render.
    results = tmp_path / "results"
    results.mkdir()
    data = json.loads((RESULTS / "core.json").read_text())
    data["calibrate_seconds"] = 123.456
    (results / "core.json").write_text(json.dumps(data))
    gen.render(results, tmp_path / "out", plots=False)
    page = (tmp_path / "out" / "core.md").read_text()
    assert "| `calibrate_seconds` | 123.5 |" in page
    assert page != (DOCS / "benchmarks" / "core.md").read_text()


def test_unknown_json_gets_a_generic_page_with_provenance(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    unknown = {"command": "python benchmarks/stream.py --json", "commit": "abc1234",
               "rows": [{"dataset": "GunPoint", "earliness": 0.25, "accuracy": 0.9},
                        {"dataset": "ECG200", "earliness": 0.5, "accuracy": 0.8}],
               "nested": {"deep": {"value": 7}}}
    (results / "stream.json").write_text(json.dumps(unknown))
    (results / "odd.json").write_text(json.dumps([1, 2, 3]))
    (results / "training.json").write_text(json.dumps({"collections": {"c": {"per_epsilon": {"0.1": {}}}}}))
    pages = gen.render(results, tmp_path / "out", plots=False)
    assert sorted(p.name for p in pages) == ["index.md", "odd.md", "stream.md", "training.md"]
    changed = (tmp_path / "out" / "training.md").read_text()
    assert "Not in the layout the training renderer knows" in changed and "KeyError" in changed
    page = (tmp_path / "out" / "stream.md").read_text()
    assert "| command | `python benchmarks/stream.py --json` |" in page
    assert "| commit | `abc1234` |" in page
    assert "| machine | not recorded |" in page
    assert "| `rows[1].dataset` | ECG200 |" in page and "| `nested.deep.value` | 7 |" in page
    assert "| command | not recorded |" in (tmp_path / "out" / "odd.md").read_text()
    assert "[stream](stream.md)" in (tmp_path / "out" / "index.md").read_text()


def test_a_generic_page_shows_the_benchmarks_own_plot_shrunk(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "search.json").write_text(json.dumps({"command": "python benchmarks/search.py", "ratio": 0.9}))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(16, 5))
    ax.plot(range(10))
    fig.savefig(results / "search.png", dpi=150)  # 2400 px wide
    plt.close(fig)
    gen.render(results, tmp_path / "out")
    page = (tmp_path / "out" / "search.md").read_text()
    assert "![search](search.png)" in page and page.index("## Plot") < page.index("## All recorded values")
    from PIL import Image

    with Image.open(tmp_path / "out" / "search.png") as img:
        assert img.width == gen.MAX_PNG_WIDTH
    (tmp_path / "np").mkdir()  # without plots: the same page, no PNG written
    assert gen.render_one(results / "search.json", tmp_path / "np", plots=False).read_text() == page
    assert not (tmp_path / "np" / "search.png").exists()


def test_known_renderers_are_chosen_and_plots_stay_small(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    for name in ("encoder_minilm.json", "training.json"):
        (results / name).write_text((RESULTS / name).read_text())
    gen.render(results, tmp_path / "out")
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["encoder_minilm_cost_risk.png", "encoder_minilm_savings.png", "training_savings.png"]
    for png in (tmp_path / "out").glob("*.png"):
        assert png.stat().st_size < 150_000, png.name
    encoder = (tmp_path / "out" / "encoder_minilm.md").read_text()
    assert "### risk = accuracy_drop" in encoder and "| max_prob | 0.02 | 1.503 |" in encoder


def test_committed_pngs_are_small() -> None:
    pngs = list((DOCS / "benchmarks").glob("*.png"))
    assert pngs
    assert all(p.stat().st_size < 150_000 for p in pngs), [p.name for p in pngs if p.stat().st_size >= 150_000]


def test_readme_is_short_and_readable() -> None:
    raw = (ROOT / "README.md").read_bytes()
    assert len(raw) <= 8192, f"README.md is {len(raw)} bytes"
    long = [i + 1 for i, line in enumerate(raw.decode().splitlines()) if len(line) > 200]
    assert not long, f"README.md lines over 200 characters: {long}"


def _relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # links inside code blocks are code
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))], ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    missing = [t for t in _relative_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_link_check_catches_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [bad](nowhere.md#x) [web](https://example.org) [anchor](#top)\n")
    assert _relative_links(page) == ["page.md", "nowhere.md#x"]


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("doc-object") > 20


def test_every_benchmark_page_is_in_the_nav() -> None:
    # A result page missing from mkdocs.yml's nav still builds, but no reader finds it.
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [p.name for p in sorted((DOCS / "benchmarks").glob("*.md")) if f"benchmarks/{p.name}" not in nav]
    assert not missing, f"Add these pages to the Benchmarks nav in mkdocs.yml: {missing}"
