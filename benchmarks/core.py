"""Core benchmark: rule simulation speed, calibration speed, validity, price of the guarantee.

    python benchmarks/core.py --json          # the full run (about 2-3 minutes on 2 cores)
    python benchmarks/core.py --json --quick  # smaller sizes, for a smoke test

All numbers are measured in this run on this machine; ratios compare things measured side by side.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import stopwise as sw  # noqa: E402
from stopwise.calibrate import table  # noqa: E402
from stopwise.synthetic import synthetic_trace  # noqa: E402
from stopwise.validity import population_repeats  # noqa: E402


def signal_trace(n: int, stages: int, seed: int) -> sw.Trace:
    """A large trace with a max-probability signal instead of full probability vectors (memory)."""
    rng = np.random.default_rng(seed)
    depth = np.arange(1, stages + 1) / stages
    ease = rng.beta(2, 2, n)[:, None]
    conf = np.clip(0.3 + 0.7 * depth[None, :] * ease + 0.1 * rng.normal(size=(n, stages)), 0.0, 1.0)
    settled = rng.random((n, stages)) < conf
    final = rng.integers(0, 4, n)
    preds = np.where(settled, final[:, None], rng.integers(0, 4, (n, stages)))
    preds[:, -1] = final
    return sw.Trace(predictions=preds, signals={"max_prob": conf}, reference=final)


def bench_decisions(n: int, stages: int) -> dict[str, float]:
    trace = signal_trace(n, stages, seed=0)
    out = {}
    for rule, lam in ((sw.MaxProb(), 0.8), (sw.Patience(), 3), (sw.Budget(), 8)):
        rule.halts(trace, lam)  # warm-up
        start = time.perf_counter()
        rule.halts(trace, lam)
        out[rule.name] = n * stages / (time.perf_counter() - start)
    return out


def bench_calibrate(n: int, stages: int, grid: int) -> float:
    trace = signal_trace(n, stages, seed=1)
    sw.calibrate(trace[:2000], sw.MaxProb(), epsilon=0.05, grid=grid)  # warm-up
    start = time.perf_counter()
    cert = sw.calibrate(trace, sw.MaxProb(), epsilon=0.05, delta=0.1, grid=grid, fwer="fixed_sequence")
    elapsed = time.perf_counter() - start
    assert cert.grid_size >= min(grid, 1000) * 0.9, cert.grid_size
    return elapsed


def bench_validity(repeats: int) -> list[dict[str, object]]:
    pool = synthetic_trace(60_000, seed=2024)
    population = synthetic_trace(200_000, seed=7)
    rows = []
    for rule, pvalue in ((sw.MaxProb(), "binomial"), (sw.Entropy(), "hoeffding_bentkus"), (sw.Patience(), "binomial")):
        res = population_repeats(pool, population, rule, n_cal=1000, repeats=repeats, epsilon=0.05, delta=0.1, pvalue=pvalue)
        rows.append(res.summary())
    return rows


def bench_price(repeats: int, n_cal: int) -> dict[str, float]:
    """Mean cost at the certified λ over mean cost at the λ whose true risk is ε."""
    eps = 0.05
    population = synthetic_trace(200_000, seed=99)
    pool = synthetic_trace(100_000, seed=98)
    rule = sw.MaxProb()
    tab = table(population, rule, "gap", grid=4000)
    # Walking from conservative to aggressive, the last λ before the true risk first exceeds ε.
    over = np.flatnonzero(tab.risk > eps)
    j_star = (over[0] - 1) if over.size else tab.risk.size - 1
    cost_star = float(tab.cost[j_star])
    z = rule.z(population)
    rng = np.random.default_rng(0)
    ratios = []
    for _r in range(repeats):
        cal = pool[np.sort(rng.choice(pool.n, n_cal, replace=False))]
        cert = sw.calibrate(cal, rule, epsilon=eps, delta=0.1)
        halts = sw.rules.halts_from_z(z, population.lengths, cert.make_rule().threshold()) if cert.certified else population.lengths - 1
        ratios.append(float(population.cost_at(halts).mean()) / cost_star)
    return {"price_of_guarantee": float(np.mean(ratios)), "price_of_guarantee_p90": float(np.quantile(ratios, 0.9)),
            "oracle_lambda_true_risk": float(tab.risk[j_star]), "oracle_lambda": float(tab.lam[j_star])}


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=Path(__file__).parent).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    args = parser.parse_args()
    n_rules, n_cal_bench, repeats, price_repeats = (
        (100_000, 20_000, 60, 30) if args.quick else (1_000_000, 100_000, 500, 200))
    decisions = bench_decisions(n_rules, 16)
    cal_s = bench_calibrate(n_cal_bench, 16, 1000)
    validity = bench_validity(repeats)
    price = bench_price(price_repeats, 2000)
    worst = max(row["violation_rate"] for row in validity)  # type: ignore[type-var]
    result = {
        "commit": commit(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "quick": args.quick,
        # Headline: the max-probability rule (the common confidence exit); every rule below.
        "rule_decisions_per_s": decisions["max_prob"],
        "rule_decisions_per_s_min_over_rules": min(decisions.values()),
        "rule_decisions_per_s_by_rule": decisions,
        "rule_inputs": n_rules,
        "rule_stages": 16,
        "calibrate_seconds": cal_s,
        "calibrate_inputs": n_cal_bench,
        "calibrate_grid": 1000,
        "validity_max_violation_rate": worst,
        "delta": 0.1,
        "validity_repeats": repeats,
        "validity": validity,
        **price,
        "price_n_calibration": 2000,
        "goals": {
            "rule_decisions_per_s>=1e8": bool(decisions["max_prob"] >= 1e8),
            "calibrate_seconds<1.0": bool(cal_s < 1.0),
            "validity_max_violation_rate<=delta+3se": bool(worst <= 0.1 + 3 * np.sqrt(0.09 / repeats)),
            "price_of_guarantee<=1.10": bool(price["price_of_guarantee"] <= 1.10),
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
