"""``stopwise training ...``: certify an early-stopping rule on recorded learning curves, and check
a certificate on new runs. Curves come as JSON (a list of per-run metric lists) or ``.npz`` (a 2-D
array under ``--key``, NaN-padded for shorter runs)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

import stopwise as sw
from stopwise._errors import StopwiseError
from stopwise.training.curves import curves_to_trace
from stopwise.training.risks import certify, check_certificate, regret_at

_RULES = ("epoch_patience", "plateau_gain", "curve_extrapolation")


def _load_curves(path: str, key: str) -> list[list[float]]:
    p = Path(path)
    if not p.is_file():
        raise StopwiseError(f"No curves file at {path!r}.")
    if p.suffix == ".npz":
        with np.load(p) as data:
            if key not in data.files:
                raise StopwiseError(f"{path!r} has no array {key!r} (arrays: {sorted(data.files)}); pass --key.")
            arr = np.asarray(data[key], dtype=np.float64)
        # NaN padding marks a run that ended: keep each run up to its last finite value.
        return [row[: int(np.flatnonzero(np.isfinite(row)).max(initial=-1)) + 1].tolist() for row in arr]
    runs = json.loads(p.read_text())
    if not isinstance(runs, list):
        raise StopwiseError(f"{path!r} must hold a JSON list of per-run metric lists.")
    return [[float(v) for v in run] for run in runs]


def _trace(args: argparse.Namespace) -> sw.Trace:
    return curves_to_trace(_load_curves(args.curves, args.key), mode=args.mode, monitor=args.monitor,
                           population=args.population, bound=args.bound, on_nonfinite="truncate", allow_ragged=True)


def _rule(name: str, trace: sw.Trace) -> sw.Rule:
    if name == "epoch_patience":
        return sw.make_rule(name)
    return sw.make_rule(name, horizon=trace.n_stages)


def cmd_certify(args: argparse.Namespace) -> int:
    trace = _trace(args)
    cert = certify(trace, _rule(args.rule, trace), epsilon=args.epsilon, delta=args.delta)
    if args.output:
        cert.save(args.output)
    summary: dict[str, Any] = {"certified": cert.certified, "rule": cert.rule, "lam": cert.lam, "epsilon": args.epsilon,
                               "delta": args.delta, "n_runs": trace.n, "compute_saved": cert.savings,
                               "calibration_regret": cert.empirical_risk * float(trace.meta["regret_bound"])}
    print(json.dumps(summary, indent=2) if args.json else
          f"{'certified' if cert.certified else 'NOT certified'}: {args.rule} λ = {cert.lam}, saves "
          f"{cert.savings:.1%} of the compute on {trace.n} runs (ε = {args.epsilon:g}, δ = {args.delta:g})")
    return 0 if cert.certified else 1


def cmd_check(args: argparse.Namespace) -> int:
    cert = sw.Certificate.load(args.certificate)
    trace = _trace(args)
    check_certificate(cert, trace)
    halts = cert.make_rule().halts(trace)
    regret = float(regret_at(trace, halts).mean())
    saved = float(1 - trace.cost_at(halts).sum() / trace.full_cost.sum())
    out = {"n_runs": trace.n, "regret": regret, "epsilon": cert.epsilon * float(trace.meta["regret_bound"]),
           "compute_saved": saved}
    print(json.dumps(out, indent=2) if args.json else f"regret {regret:.4g} (ε = {out['epsilon']:g}), saved {saved:.1%}")
    return 0


def _curve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("curves", help="JSON list of per-run metric lists, or .npz")
    p.add_argument("--key", default="curves", help="array name inside an .npz (default curves)")
    p.add_argument("--monitor", required=True, help="the metric's name, e.g. val_loss")
    p.add_argument("--mode", required=True, choices=("min", "max"))
    p.add_argument("--population", required=True, help="names the runs' population (task / search space)")
    p.add_argument("--bound", type=float, default=1.0, help="largest possible regret in metric units (default 1)")
    p.add_argument("--json", action="store_true")


def register_cli(subparsers: Any) -> None:
    """Add ``stopwise training certify|check``."""
    training = subparsers.add_parser("training", help="certified early stopping of training runs")
    sub = training.add_subparsers(dest="training_command", required=True)
    p = sub.add_parser("certify", help="certify a stopping rule on recorded learning curves")
    _curve_options(p)
    p.add_argument("--rule", default="epoch_patience", choices=_RULES)
    p.add_argument("--epsilon", type=float, required=True, help="allowed mean regret, metric units")
    p.add_argument("--delta", type=float, default=0.1)
    p.add_argument("-o", "--output", help="write the certificate JSON here")
    p.set_defaults(func=cmd_certify)
    p = sub.add_parser("check", help="measure a certificate's regret and savings on new runs")
    p.add_argument("certificate")
    _curve_options(p)
    p.set_defaults(func=cmd_check)
