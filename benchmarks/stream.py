"""Certified early classification of streams (stopwise.stream) against aeon's early classifiers.

Per bundled aeon UCR/UEA set (every equal-length classification set in the wheel; the ragged
JapaneseVowels and PickupGestureWiimoteZ run as aeon's padded `_eq` versions): the bundled
train/test parts are pooled and re-split, because their calibration part would be too small.
For each of `--train-splits` (default 1) stratified splits, 30% trains one prefix classifier per prefix length
(standardised logistic regression on the raw prefix, 20 prefix lengths); the other 70% is recorded
once and split `--splits` (default 20) times at random into calibration (60%) and test (40%). Each rule
(max_prob, margin, stability, combined) is certified at ε ∈ {0.01, 0.05}, δ = 0.1 for the gap to
the full-length classifier, marginally (LTT) and per stopping time (the conditional / ETC
procedure), and measured on the test part: accuracy, earliness (share of the series read),
harmonic mean, gap, and whether the gap held (≤ ε; conditional: at every stage). aeon's TEASER and
ProbabilityThresholdEarlyClassifier are fitted through aeon on the same training part, with the
same base classifier and classification points, and measured on the same test parts (they do
not use the calibration part; they come with no guarantee).

Text: MiniLM exit heads trained on BBC News articles, their final head read on the first 8, 16,
..., 64 words (96 tokens at most): the mean share of an article read before a certified decision.

    python benchmarks/stream.py --json          # writes benchmarks/results/stream.json (+ .png)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import stopwise as sw
from stopwise.stream import EarlyStreamClassifier, SeriesPrefixes, flat_estimator, harmonic_mean
from stopwise.stream.data import bundled_sets, load_pooled, stratified_split

EPSILONS = (0.01, 0.05)
#: Extra ε for max_prob / LTT only: our accuracy-earliness curve, to compare at equal accuracy.
CURVE_EPSILONS = (0.1, 0.2, 0.3, 0.4, 0.5)
DELTA = 0.1
RULES = ("max_prob", "margin", "stability", "combined")
METHODS = ("ltt", "conditional")
PRIMARY = ("max_prob", "ltt", 0.05)
RESULTS = Path(__file__).parent / "results"


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, cwd=Path(__file__).parent).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _scores(pred: np.ndarray, labels: np.ndarray, share: np.ndarray, full: np.ndarray) -> dict[str, float]:
    acc, earl = float((pred == labels).mean()), float(share.mean())
    return {"accuracy": acc, "earliness": earl, "harmonic_mean": harmonic_mean(acc, earl),
            "gap": float((pred != full).mean())}


def _conditional_holds(halts: np.ndarray, wrong: np.ndarray, last: int, eps: float) -> bool:
    early = halts < last
    return all(not (by := early & (halts <= t)).any() or wrong[by].mean() <= eps for t in range(last))


def aeon_baselines(prefixes: SeriesPrefixes, X: np.ndarray, codes: np.ndarray, Xrest: np.ndarray,
                   seed: int, times: dict[str, list[float]]) -> dict[str, dict[str, np.ndarray]]:
    """Predicted class index and share read per row of Xrest, for each aeon early classifier."""
    from aeon.classification.early_classification import TEASER, ProbabilityThresholdEarlyClassifier

    points = [int(m) for m in prefixes.stage_lengths_]
    out = {}
    for name, clf in (("TEASER", TEASER(estimator=flat_estimator(), classification_points=points, random_state=seed)),
                      ("ProbabilityThreshold", ProbabilityThresholdEarlyClassifier(
                          estimator=flat_estimator(), classification_points=points, random_state=seed))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            clf.fit(X, codes)
            times.setdefault(name, []).append(time.perf_counter() - t0)
            pred, _ = clf.predict(Xrest)
        state = np.asarray(clf.state_info)
        # state_info[:, 0]: the classification point each row was decided at (all ours are >= 3
        # and end at the full length, so aeon keeps the list as given).
        used = np.asarray(points)[state[:, 0].astype(int)]
        out[name] = {"pred": np.asarray(pred).astype(int), "share": used / X.shape[2]}
    return out


def bootstrap_validity(trace: sw.Trace, *, n_cal: int, seed: int, repeats: int = 200,
                       conditional_repeats: int = 40) -> dict[str, Any]:
    """The exact check of the guarantee (stopwise.validity): calibration sets of ``n_cal`` drawn with
    replacement from the recorded pool, the true risk being the risk on the whole pool, no test
    noise. max_prob only; the share of draws whose certificate is wrong must be <= δ."""
    from stopwise.validity import bootstrap_repeats

    out: dict[str, Any] = {}
    rng = np.random.default_rng(seed)
    assert trace.reference is not None
    for eps in EPSILONS:
        try:
            res = bootstrap_repeats(trace, sw.MaxProb(), n_cal=n_cal, repeats=repeats, epsilon=eps, delta=DELTA, seed=seed)
            out[f"ltt/{eps:g}"] = {"wrong_share": res.violation_rate, "certified_share": float(res.certified.mean()),
                                   "repeats": repeats}
        except sw.CalibrationError as exc:
            out[f"ltt/{eps:g}"] = {"certifiable": False, "reason": str(exc)}
        wrong, opened = 0, 0
        for r in range(conditional_repeats):
            cal = trace[np.sort(rng.integers(0, trace.n, n_cal))]
            try:
                cert = sw.calibrate(cal, sw.MaxProb(), epsilon=eps, delta=DELTA, method="conditional", seed=r, grid=50)
            except sw.CalibrationError as exc:
                out[f"conditional/{eps:g}"] = {"certifiable": False, "reason": str(exc)}
                break
            halts = cert.make_rule().halts(trace)
            opened += cert.certified
            wrong += not _conditional_holds(halts, trace.predictions[np.arange(trace.n), halts] != trace.reference,
                                            trace.n_stages - 1, eps)
        else:
            out[f"conditional/{eps:g}"] = {"wrong_share": wrong / conditional_repeats,
                                           "certified_share": opened / conditional_repeats, "repeats": conditional_repeats}
    return out


def run_dataset(name: str, *, train_splits: int, splits: int, progress: bool) -> dict[str, Any]:
    X, y = load_pooled(name)
    t0 = time.perf_counter()
    rows: dict[str, list[dict[str, Any]]] = {}
    info: dict[str, Any] = {"n": int(len(y)), "channels": int(X.shape[1]), "length": int(X.shape[2]),
                            "classes": int(np.unique(y).size)}
    for s in range(train_splits):
        tr, rest = stratified_split(y, (0.3, 0.7), seed=s)
        t_fit = time.perf_counter()
        prefixes = SeriesPrefixes(n_stages=20).fit(X[tr], y[tr])
        info.setdefault("fit_seconds", {}).setdefault("stopwise_prefixes", []).append(time.perf_counter() - t_fit)
        model = EarlyStreamClassifier(prefixes, epsilon=0.05)
        trace = model.record(X[rest], y[rest])
        assert trace.labels is not None
        info["stages"], info["n_calibration"] = prefixes.n_stages, int(round(0.6 * len(rest)))
        base = aeon_baselines(prefixes, X[tr], prefixes.encode(y[tr]), X[rest], seed=s, times=info["fit_seconds"])
        last = prefixes.n_stages - 1
        if s == 0:
            info["bootstrap_validity"] = bootstrap_validity(trace, n_cal=info["n_calibration"], seed=s)
        for r in range(splits):
            perm = np.random.default_rng(1000 * s + r).permutation(trace.n)
            n_cal = int(round(0.6 * trace.n))
            cal_rows, te_rows = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
            cal, te = trace[cal_rows], trace[te_rows]
            assert te.labels is not None and te.reference is not None
            for bname, b in base.items():
                sc = _scores(b["pred"][te_rows], te.labels, b["share"][te_rows], te.reference)
                rows.setdefault(bname, []).append({**sc, "holds": None, "certified": False})
            for eps in (*EPSILONS, *CURVE_EPSILONS):
                for rule in RULES if eps in EPSILONS else ("max_prob",):
                    m = EarlyStreamClassifier(prefixes, rule=rule, epsilon=eps, delta=DELTA, seed=r)
                    try:
                        m.calibrate_trace(cal)
                    except sw.CalibrationError:
                        pass
                    for method in METHODS if eps in EPSILONS else ("ltt",):
                        cert = m.certificates_.get(method)
                        key = f"{rule}/{method}/{eps:g}"
                        if cert is None:
                            rows.setdefault(key, []).append({"too_small": m.calibration_errors_[method]})
                            continue
                        halts = cert.make_rule().halts(te)
                        pred = te.predictions[np.arange(te.n), halts]
                        sc = _scores(pred, te.labels, te.cost_at(halts), te.reference)
                        holds = sc["gap"] <= eps
                        cond = _conditional_holds(halts, pred != te.reference, last, eps)
                        rows.setdefault(key, []).append({**sc, "holds": holds, "holds_conditional": cond,
                                                         "certified": bool(cert.certified)})
        if progress:
            print(f"  {name} train split {s}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    summary: dict[str, Any] = {}
    for key, rs in rows.items():
        ok = [r for r in rs if "too_small" not in r]
        if not ok:
            summary[key] = {"certifiable": False, "reason": rs[0]["too_small"]}
            continue
        entry: dict[str, Any] = {k: float(np.mean([r[k] for r in ok])) for k in ("accuracy", "earliness", "harmonic_mean", "gap")}
        if ok[0]["holds"] is not None:
            entry["certified_share"] = float(np.mean([r["certified"] for r in ok]))
            entry["holds_share"] = float(np.mean([r["holds"] for r in ok]))
            entry["holds_conditional_share"] = float(np.mean([r["holds_conditional"] for r in ok]))
        summary[key] = entry
    return {**info, "seconds": time.perf_counter() - t0, "results": summary, "goal": goal(summary)}


def goal(summary: dict[str, Any]) -> dict[str, Any]:
    """Against each aeon baseline: the earliest certified max_prob / LTT configuration (any ε of
    the curve) whose accuracy is at least the baseline's (within 0.005), and whether it reads less.
    The goal counts as met when that holds against the aeon baseline with the better harmonic mean."""
    ours = {eps: summary.get(f"max_prob/ltt/{eps:g}", {}) for eps in (*EPSILONS, *CURVE_EPSILONS)}
    out: dict[str, Any] = {}
    for name in ("TEASER", "ProbabilityThreshold"):
        b = summary[name]
        ok = {e: o for e, o in ours.items() if "accuracy" in o and o["accuracy"] >= b["accuracy"] - 0.005}
        if not ok:
            out[name] = {"beaten": False, "why": "no certified configuration reaches its accuracy"}
            continue
        eps, o = min(ok.items(), key=lambda kv: kv[1]["earliness"])
        out[name] = {"beaten": bool(o["earliness"] < b["earliness"]), "epsilon": eps,
                     "accuracy_vs": o["accuracy"] - b["accuracy"], "earliness_vs": o["earliness"] - b["earliness"]}
    best = max(("TEASER", "ProbabilityThreshold"), key=lambda k: summary[k]["harmonic_mean"])
    return {"met": out[best]["beaten"], "best_aeon": best, **out}


def run_text(*, n_train: int, n_pool: int, splits: int) -> dict[str, Any]:
    """MiniLM final head on article prefixes; the share of an article read before a certified label."""
    import torch

    from stopwise.encoder import EarlyExitClassifier
    from stopwise.encoder.data import bbc_news, group_split
    from stopwise.stream import TextPrefixes, erde_macro

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    data = bbc_news()
    tr_rows, pool_rows = group_split(data, (0.3, 0.7), seed=0)
    train, pool = data.take(tr_rows[:n_train]), data.take(pool_rows[:n_pool])
    clf = EarlyExitClassifier.from_base("minilm", class_names=data.class_names, max_length=96)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(train.texts, train.labels, progress=False, epochs=60)

    # predict without a rule is the full model: the final head, the same values as the recorded one.
    prefixes = TextPrefixes(lambda texts: clf.predict(texts).probs, classes=data.class_names, words_per_stage=8, n_stages=8)
    model = EarlyStreamClassifier(prefixes, epsilon=0.05)
    trace = model.record(pool.texts, pool.labels)
    assert trace.labels is not None and trace.reference is not None
    out: dict[str, Any] = {"n_train": len(train), "n_pool": len(pool), "words_per_stage": 8, "stages": 8,
                           "full_length_accuracy": float((trace.reference == trace.labels).mean()),
                           "mean_article_words": float(np.mean([len(t.split()) for t in pool.texts]))}
    for eps in EPSILONS:
        for method in METHODS:
            acc, share, frac, gap, cert_n, holds, erde5, erde50 = [], [], [], [], [], [], [], []
            for r in range(splits):
                perm = np.random.default_rng(r).permutation(trace.n)
                n_cal = int(round(0.6 * trace.n))
                cal, te = trace[np.sort(perm[:n_cal])], trace[np.sort(perm[n_cal:])]
                m = EarlyStreamClassifier(prefixes, epsilon=eps, delta=DELTA, method=method, seed=r)
                try:
                    m.calibrate_trace(cal)
                except sw.CalibrationError as exc:
                    out[f"max_prob/{method}/{eps:g}"] = {"certifiable": False, "reason": str(exc)}
                    break
                halts = m.certificate_.make_rule().halts(te)
                pred = te.predictions[np.arange(te.n), halts]
                assert te.labels is not None and te.reference is not None
                acc.append(float((pred == te.labels).mean()))
                share.append(float(te.cost_at(halts).mean()))
                frac.append(float(((halts + 1) / prefixes.n_stages).mean()))
                gap.append(float((pred != te.reference).mean()))
                holds.append(gap[-1] <= eps)
                cert_n.append(m.certificate_.certified)
                erde5.append(erde_macro(te.labels, pred, halts + 1, o=5))
                erde50.append(erde_macro(te.labels, pred, halts + 1, o=50))
            else:
                out[f"max_prob/{method}/{eps:g}"] = {
                    "accuracy": float(np.mean(acc)), "share_of_article_read": float(np.mean(share)),
                    "share_of_full_model_input_read": float(np.mean(frac)), "gap": float(np.mean(gap)),
                    "holds_share": float(np.mean(holds)), "certified_share": float(np.mean(cert_n)),
                    "erde5_macro": float(np.mean(erde5)), "erde50_macro": float(np.mean(erde50))}
    out["seconds"] = time.perf_counter() - t0
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    """One panel per data set: our certified accuracy-earliness curve over ε beside aeon's points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rule, method, _ = PRIMARY
    cols = 5
    rows = max(1, -(-len(results) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, d) in zip(axes.flat, results.items(), strict=False):
        pts = [(eps, d["results"].get(f"{rule}/{method}/{eps:g}", {})) for eps in (*EPSILONS, *CURVE_EPSILONS)]
        pts = [(eps, e) for eps, e in pts if "accuracy" in e]
        if pts:
            ax.plot([e["earliness"] for _, e in pts], [e["accuracy"] for _, e in pts], "o-", color="C0",
                    label=f"stopwise ({rule}, {method})")
            for eps, e in pts:
                ax.annotate(f"{eps:g}", (e["earliness"], e["accuracy"]), fontsize=6, xytext=(2, 2),
                            textcoords="offset points")
        for key, marker, color in (("TEASER", "s", "C3"), ("ProbabilityThreshold", "^", "C2")):
            e = d["results"].get(key, {})
            if "accuracy" in e:
                ax.scatter(e["earliness"], e["accuracy"], marker=marker, color=color, label=key, zorder=3)
        ax.set_title(f"{name} ({'met' if d['goal']['met'] else 'not met'})", fontsize=8)
        ax.set_xlim(0, 1.02)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=6)
    fig.supxlabel("earliness (share of the series read)", fontsize=8)
    fig.supylabel("accuracy", fontsize=8)
    fig.suptitle("Certified ε (labels on the curve) vs aeon's early classifiers, δ = 0.1", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object and write the results file")
    parser.add_argument("--datasets", nargs="*", default=None, help="default: every bundled equal-length set")
    parser.add_argument("--train-splits", type=int, default=1)
    parser.add_argument("--splits", type=int, default=20, help="calibration/test splits per training split")
    parser.add_argument("--no-text", action="store_true")
    parser.add_argument("--text-articles", type=int, default=400, help="articles recorded for calibration/test")
    parser.add_argument("--out", default=str(RESULTS / "stream.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    t0 = time.perf_counter()
    names = args.datasets or bundled_sets()
    results = {}
    for name in tqdm(names, desc="data sets", file=sys.stderr):
        results[name] = run_dataset(name, train_splits=args.train_splits, splits=args.splits, progress=True)
    text = None if args.no_text else run_text(n_train=200, n_pool=args.text_articles, splits=args.splits)
    met = [n for n, d in results.items() if d["goal"]["met"]]
    payload = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit(),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "epsilons": EPSILONS, "curve_epsilons": CURVE_EPSILONS, "delta": DELTA, "primary": "/".join(map(str, PRIMARY)),
        "protocol": "pooled train+test, 30% train / 70% recorded, 60/40 calibration/test splits; "
                    "holds_share: share of splits with test gap <= epsilon (a split diagnostic, stricter than the "
                    "guarantee: the small test part's gap is noisy); bootstrap_validity: the exact check "
                    "(calibration drawn with replacement from the recorded pool, true risk on the pool)",
        "goal_met_on": met, "goal_met_count": f"{len(met)} of {len(results)}",
        "datasets": results, "text_bbc_minilm": text,
        "seconds": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=float))
    plot(results, out.with_suffix(".png"))
    if args.json:
        print(json.dumps(payload, indent=2, default=float))
    else:
        for name, d in results.items():
            print(name, d["goal"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
