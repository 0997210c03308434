"""Render every ``benchmarks/results/*.json`` into a Markdown page (and small PNG plots) under docs/.

Usage: ``python docs/gen_benchmarks.py [--results DIR] [--out DIR] [--no-plots]``.

The pages are generated, never edited by hand: ``tests/test_docs.py`` re-renders them into a temporary
folder and fails when a committed page and its JSON disagree. A JSON this script does not know gets a
generic page (provenance and a flattened table of its values), so a new result never breaks the build.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stopwise._errors import param_error

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "benchmarks"
NOT_RECORDED = "not recorded"
MAX_GENERIC_ROWS = 400
MAX_PNG_WIDTH = 1100
Page = list[str]


def fmt(value: Any) -> str:
    """Format one cell: 4 significant digits for floats, short lists inline, '—' for None."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    if isinstance(value, list):
        if len(value) <= 6 and all(not isinstance(v, (list, dict)) for v in value):
            return ", ".join(fmt(v) for v in value)
        return f"[{len(value)} values]"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def table(header: list[str], rows: list[list[Any]]) -> Page:
    """A Markdown table; cells go through :func:`fmt` unless already strings."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |")
    return lines + [""]


def flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every scalar leaf of a JSON value as (dotted.path, value); short scalar lists stay one leaf."""
    if isinstance(obj, dict):
        out: list[tuple[str, Any]] = []
        for key, value in obj.items():
            out.extend(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        out = []
        for i, value in enumerate(obj):
            out.extend(flatten(value, f"{prefix}[{i}]"))
        return out
    return [(prefix, obj)]


def provenance(data: Any, name: str) -> Page:
    """The command, commit, machine and date the JSON records ('not recorded' where it lacks one)."""
    rec = data if isinstance(data, dict) else {}
    machine = rec.get("machine")
    if machine is None and (rec.get("platform") or rec.get("cpu_count")):
        machine = f"{rec.get('platform', NOT_RECORDED)}, {rec.get('cpu_count', '?')} CPUs"
    rows = [["file", f"`benchmarks/results/{name}`"]]
    for key, value in (("command", rec.get("command")), ("commit", rec.get("commit")),
                       ("machine", machine), ("date", rec.get("date"))):
        rows.append([key, NOT_RECORDED if value is None else f"`{fmt(value)}`"])
    return table(["recorded", "value"], rows)


def figure(source: Path, out: Path, stem: str, plots: bool) -> Page:
    """The benchmark's own PNG beside its JSON, copied (shrunk to at most ``MAX_PNG_WIDTH`` pixels
    wide) next to the page: a generic page's table holds the numbers, the benchmark's plot the shape.
    The page is the same with ``plots=False``, which only skips writing the PNG."""
    from PIL import Image

    if not plots:
        return _figure_lines(stem)
    with Image.open(source) as img:
        if img.width > MAX_PNG_WIDTH:
            img = img.resize((MAX_PNG_WIDTH, round(img.height * MAX_PNG_WIDTH / img.width)), Image.Resampling.LANCZOS)
        # A 256-colour palette: line plots lose nothing visible and the page's PNG stays small.
        img.convert("RGB").quantize(colors=256).save(out / f"{stem}.png", optimize=True)
    return _figure_lines(stem)


def _figure_lines(stem: str) -> Page:
    return ["## Plot", "", f"![{stem}]({stem}.png)", "",
            f"Drawn by the benchmark itself (`benchmarks/results/{stem}.png`).", ""]


def generic(data: Any, stem: str, out: Path, plots: bool, source_png: Path | None = None) -> Page:
    """Any JSON: its benchmark's plot when one lies beside it, then a flattened key/value table of its scalars."""
    leaves = flatten(data)
    page = figure(source_png, out, stem, plots) if source_png is not None and source_png.is_file() else []
    page += ["## All recorded values", ""]
    skip = {"command", "commit", "machine", "date"}
    rows: list[list[Any]] = [[f"`{k}`", v] for k, v in leaves if k not in skip]
    if len(rows) > MAX_GENERIC_ROWS:
        page += [f"The first {MAX_GENERIC_ROWS} of {len(rows)} values; the JSON holds the rest.", ""]
        rows = rows[:MAX_GENERIC_ROWS]
    return page + table(["key", "value"], rows)


def scalars(data: dict[str, Any]) -> Page:
    """The top-level scalars (and short lists) of a JSON, as a key/value table."""
    skip = {"command", "commit", "machine", "date"}
    rows: list[list[Any]] = [[f"`{k}`", v] for k, v in data.items()
                             if k not in skip and not isinstance(v, dict)
                             and not (isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v))]
    return table(["key", "value"], rows) if rows else []


def _figure(n_panels: int) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_panels, figsize=(4.2 * n_panels, 3.2), dpi=80, squeeze=False)
    return fig, axes[0]


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def encoder(data: dict[str, Any], stem: str, out: Path, plots: bool) -> Page:
    """benchmarks/encoder.py: one table per (task, risk), savings vs ε and cost–risk plots."""
    page = ["## Summary", ""] + scalars(data)
    tasks = data["results"]
    for task in tasks:
        n_layers = task["n_layers"]
        page += [f"## {task['task']} ({task['backbone']}, {n_layers} layers)", "",
                 f"{task['n_train']} train / {task['n_cal']} calibration / {task['n_test']} test inputs; "
                 f"full-model accuracy {fmt(task['full_accuracy'])}. Wall and ideal speed-ups are over the "
                 "full model at batch 32 / batch 1.", ""]
        for risk in sorted({r["risk"] for r in task["rows"]}):
            rows = [r for r in task["rows"] if r["risk"] == risk]
            oracle = rows[0]["oracle_mean_layers"]
            page += [f"### risk = {risk} (oracle {fmt(oracle)} layers)", ""]
            page += table(
                ["rule", "ε", "layers", "test gap", "Δ acc (pts)", "wall × b32 / b1", "ideal × b32 / b1"],
                [[r["rule"], r["epsilon"], r["mean_layers"] if r["certified"] else "not certified",
                  r["test_gap"], 100 * (r["early_accuracy"] - r["full_accuracy"]),
                  f"{fmt(r.get('wall_speedup_b32'))} / {fmt(r.get('wall_speedup_b1'))}",
                  f"{fmt(r.get('ideal_speedup_b32'))} / {fmt(r.get('ideal_speedup_b1'))}"] for r in rows])
    if plots:
        fig, axes = _figure(len(tasks))
        for ax, task in zip(axes, tasks, strict=True):
            n = task["n_layers"]
            for risk in sorted({r["risk"] for r in task["rows"]}):
                for rule in sorted({r["rule"] for r in task["rows"]}):
                    rows = sorted((r for r in task["rows"] if r["risk"] == risk and r["rule"] == rule),
                                  key=lambda r: r["epsilon"])
                    ax.plot([r["epsilon"] for r in rows], [1 - r["mean_layers"] / n for r in rows],
                            marker="o", lw=1.2, label=f"{rule}, {risk}")
                oracle = next(r["oracle_mean_layers"] for r in task["rows"] if r["risk"] == risk)
                ax.axhline(1 - oracle / n, ls="--", lw=1, color="grey" if risk == "gap" else "black",
                           label=f"oracle, {risk}")
            ax.set(title=task["task"], xlabel="ε", ylabel="share of layers saved", ylim=(0, 1),
                   xticks=sorted({r["epsilon"] for r in task["rows"]}))
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=6)
        _save(fig, out / f"{stem}_savings.png")
        fig, axes = _figure(len(tasks))
        for ax, task in zip(axes, tasks, strict=True):
            n = task["n_layers"]
            for risk, marker in (("gap", "o"), ("accuracy_drop", "s")):
                rows = [r for r in task["rows"] if r["risk"] == risk and r["certified"]]
                if not rows:
                    continue
                ax.scatter([r["mean_layers"] / n for r in rows], [r["test_risk"] for r in rows],
                           marker=marker, s=18, label=f"certified rows, {risk}")
                ax.scatter([rows[0]["oracle_mean_layers"] / n], [0.0], marker="D", s=30, color="black",
                           zorder=5, label="oracle" if risk == "gap" else None)
            ax.axhline(max(r["epsilon"] for r in task["rows"]), color="grey", ls="--", lw=1, label="largest ε")
            ax.set(title=task["task"], xlabel="mean layers / full", ylabel="test risk", xlim=(0, 1.02))
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=6)
        _save(fig, out / f"{stem}_cost_risk.png")
    # The page links the plots whether or not this run draws them, so a page never depends on --no-plots.
    return page + ["## Plots", "", f"![savings vs ε]({stem}_savings.png)", "",
                   f"![cost vs risk]({stem}_cost_risk.png)", ""]


def training(data: dict[str, Any], stem: str, out: Path, plots: bool) -> Page:
    """benchmarks/training.py: per collection and ε, the certified stop against baselines and the oracle."""
    page = ["## Summary", ""] + scalars(data)
    collections = data["collections"]
    for name, coll in collections.items():
        page += [f"## {name}", "", f"{coll.get('n_runs')} runs × {coll.get('n_stages')} stages, "
                 f"{coll.get('n_calibration')} for calibration, {coll.get('splits')} splits, "
                 f"δ = {fmt(coll.get('delta'))}. Violations: share of splits whose regret exceeds ε. "
                 "The oracle stops every run at its best evaluation (zero regret), so a rule allowed "
                 "a regret of ε can save more.", ""]
        for eps, res in coll["per_epsilon"].items():
            rows: list[list[Any]] = [[key.replace("_", " "), *(res[key].get(k) for k in
                                      ("compute_saved", "regret", "regret_p90", "violations"))]
                                     for key in ("certified", "certified_learned") if key in res]
            rows += [[b, *(v.get(k) for k in ("compute_saved", "regret", "regret_p90", "violations"))]
                     for b, v in res["baselines"].items()]
            o = res["oracle"]
            rows.append(["oracle", o.get("compute_saved"), o.get("regret"), o.get("regret_p90"), None])
            page += [f"### ε = {eps}", ""]
            page += table(["method", "compute saved", "regret", "regret p90", "violations"], rows)
    if plots:
        fig, axes = _figure(len(collections))
        for ax, (name, coll) in zip(axes, collections.items(), strict=True):
            eps = sorted(coll["per_epsilon"], key=float)
            xs = [float(e) for e in eps]
            per = [coll["per_epsilon"][e] for e in eps]
            for key in ("certified", "certified_learned"):
                if key in per[0]:
                    ax.plot(xs, [p[key]["compute_saved"] for p in per], marker="o", lw=1.5, label=key.replace("_", " "))
            for b in per[0]["baselines"]:
                ax.plot(xs, [p["baselines"][b]["compute_saved"] for p in per], lw=0.8, ls=":", label=b)
            ax.plot(xs, [p["oracle"]["compute_saved"] for p in per], color="black", ls="--", lw=1,
                    label="oracle")
            ax.set(title=name, xlabel="ε", ylabel="compute saved", ylim=(0, 1), xticks=xs)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=6)
        _save(fig, out / f"{stem}_savings.png")
    return page + ["## Plot", "", f"![compute saved vs ε]({stem}_savings.png)", ""]


def core(data: dict[str, Any], stem: str, out: Path, plots: bool) -> Page:
    """benchmarks/core.py: throughput, calibration time, validity runs, price of the guarantee."""
    page = ["## Summary", ""] + scalars(data)
    page += ["## Rule throughput", ""] + table(
        ["rule", "decisions / s"], [[k, v] for k, v in data.get("rule_decisions_per_s_by_rule", {}).items()])
    page += ["## Validity runs", ""] + table(
        ["rule", "risk", "p-value", "ε", "violation rate", "mean savings"],
        [[v["rule"], v["risk"], v["pvalue"], v["epsilon"], v["violation_rate"], v["mean_savings"]]
         for v in data.get("validity", [])])
    page += ["## Goals", ""] + table(["goal", "met"], [[f"`{k}`", v] for k, v in data.get("goals", {}).items()])
    return page


def decoder(data: dict[str, Any], stem: str, out: Path, plots: bool) -> Page:
    """benchmarks/decoder.py: tokens per second by method, then every recorded value."""
    greedy = data.get("hf_greedy_tps")

    def row(name: str, tps: Any, identical: Any) -> list[Any]:
        ratio = tps / greedy if isinstance(tps, (int, float)) and isinstance(greedy, (int, float)) else None
        return [name, tps, ratio, identical]

    spec = data.get("speculative_context_only", {})
    heads = data.get("speculative_exit_heads_only", {})
    rows = [row("transformers greedy", greedy, None), row("stopwise greedy", data.get("own_greedy_tps"), None),
            row("self-speculative", data.get("speculative_tps"), data.get("identical_fraction")),
            row("context drafts only", spec.get("tps"), spec.get("identical_fraction")),
            row("exit-head drafts only", heads.get("tps"), heads.get("identical_fraction")),
            row("transformers prompt lookup", data.get("hf_prompt_lookup_tps"),
                data.get("hf_prompt_lookup_identical_fraction")),
            row("transformers assistant_early_exit", data.get("hf_assistant_early_exit", {}).get("tps"), None),
            row("early exit (certified)", data.get("early_exit_tps"), None)]
    page = [f"## Tokens per second ({data.get('prompts')} prompts × {data.get('max_new_tokens')} tokens, batch 1)", ""]
    page += table(["method", "tok/s", "tok/s ÷ transformers greedy", "identical share"], rows)
    agreement = data.get("agreement", {})
    if agreement:
        page += ["## Exit-head agreement with the final layer", ""]
        page += table(["layer", "agreement"], [[k, agreement[k]] for k in sorted(agreement, key=int)])
    return page + generic(data, stem, out, plots)


KNOWN: dict[str, Callable[[dict[str, Any], str, Path, bool], Page]] = {
    "encoder": encoder, "training": training, "core": core, "decoder": decoder}


def kind(data: Any, stem: str) -> str:
    """Which renderer a JSON gets: by its ``benchmark`` field or its file name, else 'generic'."""
    if isinstance(data, dict):
        name = data.get("benchmark", stem)
        if name in KNOWN and (name != "encoder" or "results" in data):
            return str(name)
        if stem in KNOWN and stem != "encoder":
            return stem
    return "generic"


def render_one(path: Path, out: Path, *, plots: bool = True) -> Path:
    """Render one result JSON to ``out/<stem>.md`` (plus PNGs); returns the page's path."""
    data = json.loads(path.read_text())
    stem = path.stem
    which = kind(data, stem)
    page = [f"# {stem}", "", "Generated by `docs/gen_benchmarks.py` from the JSON; do not edit by hand.", ""]
    page += provenance(data, path.name)
    if which == "generic":
        body = generic(data, stem, out, plots, path.with_suffix(".png"))
    else:
        try:
            body = KNOWN[which](data, stem, out, plots)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # A result whose layout changed must still get a page; the page says why it is the plain one.
            body = [f"!!! warning \"Not in the layout the {which} renderer knows\"",
                    f"    It failed with `{type(exc).__name__}: {exc}`; every value is listed instead.", ""]
            body += generic(data, stem, out, plots, path.with_suffix(".png"))
    target = out / f"{stem}.md"
    target.write_text("\n".join(page + body).rstrip() + "\n")
    return target


def render(results: Path = RESULTS, out: Path = OUT, *, plots: bool = True) -> list[Path]:
    """Render every ``*.json`` in ``results`` and an index page; returns the pages written."""
    files = sorted(results.glob("*.json"))
    if not files:
        raise param_error("results", "render", "a folder holding *.json result files", results)
    out.mkdir(parents=True, exist_ok=True)
    pages = [render_one(f, out, plots=plots) for f in files]
    index = ["# Benchmark results", "",
             "Each page below is generated from one file in `benchmarks/results/` by `docs/gen_benchmarks.py`",
             "(`make docs` runs it). A page shows the command, commit and machine its JSON records.", ""]
    index += table(["result", "renderer"], [[f"[{p.stem}]({p.name})", kind(json.loads(f.read_text()), f.stem)]
                                           for p, f in zip(pages, files, strict=True)])
    (out / "index.md").write_text("\n".join(index).rstrip() + "\n")
    return [*pages, out / "index.md"]


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--no-plots", action="store_true", help="write the Markdown pages only")
    args = parser.parse_args(argv)
    for page in render(args.results, args.out, plots=not args.no_plots):
        print(page)


if __name__ == "__main__":
    main()
