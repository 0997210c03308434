"""The `stopwise` command: calibrate, report, check, rules; adapters add their own subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from stopwise._version import __version__
from stopwise.core.errors import StopwiseError
from stopwise.core.plugins import import_if_present

#: Adapter modules that may add subcommands through ``register_cli(subparsers)``.
ADAPTER_CLIS = ("stopwise.encoder.cli", "stopwise.decoder.cli", "stopwise.sampling.cli", "stopwise.training.cli",
                "stopwise.stream.cli", "stopwise.serve.cli")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_params(items: Sequence[str] | None) -> dict[str, Any]:
    """``["window=5", "leader=mode"]`` -> ``{"window": 5, "leader": "mode"}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StopwiseError(f"The '--param' option must look like NAME=VALUE. Got {item!r} instead.")
        out[key] = _value(value)
    return out


def emit(payload: dict[str, Any], *, as_json: bool, text: str) -> None:
    print(json.dumps(payload, indent=2, sort_keys=True) if as_json else text)


def cmd_rules(args: argparse.Namespace) -> int:
    from stopwise.core.rules import describe_rules

    rows = describe_rules()
    lines = [f"{r['name']:<17} {r['fires_when']:<17} default λ={r['default_lam']!s:<6} {r['summary']}" for r in rows]
    emit({"rules": rows}, as_json=args.json, text="\n".join(lines))
    return 0


def _risk(args: argparse.Namespace) -> Any:
    from stopwise.core.risks import make_risk

    return make_risk(args.risk, **parse_params(args.risk_param))


def cmd_calibrate(args: argparse.Namespace) -> int:
    from stopwise.core.calibrate import calibrate
    from stopwise.core.rules import make_rule
    from stopwise.core.trace import Trace

    trace = Trace.load(args.trace)
    rule = make_rule(args.rule, **parse_params(args.param))
    cert = calibrate(trace, rule, epsilon=args.epsilon, delta=args.delta, risk=_risk(args), method=args.method,
                     pvalue=args.pvalue, fwer=args.fwer, grid=args.grid, seed=args.seed)
    if args.output:
        cert.save(args.output)
    emit(cert.to_dict(), as_json=args.json, text=str(cert) + (f"\nsaved to {args.output}" if args.output else ""))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from stopwise.core.report import pareto, plot_pareto
    from stopwise.core.rules import make_rule
    from stopwise.core.trace import Trace

    trace = Trace.load(args.trace)
    names = [n for n in args.rules.split(",") if n]
    rules = [make_rule(n) for n in names]
    parts = []
    for rule in tqdm(rules, desc="rules", disable=args.json or not sys.stderr.isatty()):
        parts.append(pareto(trace, [rule], risk=_risk(args), epsilon=args.epsilon, delta=args.delta, grid=args.grid))
    result = dict(parts[0])
    result["rules"] = [p["rules"][0] for p in parts]
    if args.plot:
        plot_pareto(result, args.plot)
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(result, fh, indent=2, sort_keys=True)
    lines = [f"n = {result['n']}, {result['n_stages']} stages, risk {result['risk']}, full cost {result['full_cost']:.4g}",
             f"oracle: cost {result['oracle']['cost']:.4g}, mean stages {result['oracle']['mean_stages']:.3g}"]
    for row in result["rules"]:
        cert = row.get("certified")
        tail = "" if not cert else (
            f" certified λ={cert['lam']:.4g} risk {cert['risk']:.4g} cost {cert['cost']:.4g}" if cert["certified"]
            else " not certified")
        lines.append(f"{row['rule']}: {len(row['lam'])} λ values;{tail}")
    if args.plot:
        lines.append(f"plot written to {args.plot}")
    emit(result, as_json=args.json, text="\n".join(lines))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from stopwise.core.certificate import Certificate
    from stopwise.core.trace import Trace

    cert = Certificate.load(args.certificate)
    result = cert.check(Trace.load(args.trace))
    verdict = "OK" if result["within_epsilon"] else "VIOLATED"
    text = (f"{verdict}: risk {result['risk']:.4g} vs ε = {result['epsilon']:g} on n = {result['n']}; "
            f"cost {result['expected_cost']:.4g} of {result['full_cost']:.4g} (saves {100 * result['savings']:.1f}%)")
    emit(result, as_json=args.json, text=text)
    return 0 if result["within_epsilon"] else 1


def cmd_validate(args: argparse.Namespace) -> int:
    from stopwise.core.rules import make_rule
    from stopwise.core.trace import Trace
    from stopwise.core.validity import bootstrap_repeats, split_repeats

    trace = Trace.load(args.trace)
    n_cal = args.n_cal or trace.n // 2
    if not 0 < n_cal < trace.n:
        raise StopwiseError(f"The '--n-cal' option must be in [1, {trace.n - 1}] for this trace. Got {n_cal} instead.")
    if args.mode not in ("bootstrap", "split"):
        raise StopwiseError(f"The '--mode' option must be 'bootstrap' or 'split'. Got {args.mode!r} instead.")
    repeat = bootstrap_repeats if args.mode == "bootstrap" else split_repeats
    res = repeat(trace, make_rule(args.rule, **parse_params(args.param)), n_cal=n_cal, repeats=args.repeats,
                        epsilon=args.epsilon, delta=args.delta, risk=_risk(args), pvalue=args.pvalue,
                        progress=not args.json and sys.stderr.isatty())
    summary = {**res.summary(), "allowance": res.allowance, "valid": res.violation_rate <= res.allowance}
    text = (f"{summary['rule']}: {res.repeats} {args.mode} calibrations (n_cal = {n_cal}), risk > ε in "
            f"{100 * res.violation_rate:.1f}% (allowed {100 * res.allowance:.1f}% = δ + 3 s.e.), "
            f"certified in {100 * summary['certified_rate']:.0f}%, mean savings {100 * summary['mean_savings']:.1f}%")
    emit(summary, as_json=args.json, text=text)
    return 0 if summary["valid"] else 1


def cmd_info(args: argparse.Namespace) -> int:
    from stopwise.core.trace import Trace

    trace = Trace.load(args.trace)
    info = {"n": trace.n, "n_stages": trace.n_stages, "has_probs": trace.probs is not None,
            "has_labels": trace.labels is not None, "signals": sorted(trace.signals),
            "stage_names": list(trace.stage_names or []), "meta": dict(trace.meta),
            "fingerprint": trace.fingerprint()}
    emit(info, as_json=args.json, text=repr(trace))
    return 0


def _calibration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--risk", default="gap", help="gap | accuracy_drop | selective | loss (default: gap)")
    p.add_argument("--risk-param", action="append", metavar="NAME=VALUE", help="risk parameter, e.g. signal=rouge_loss")
    p.add_argument("--delta", type=float, default=0.1, help="allowed probability of a wrong certificate (default 0.1)")
    p.add_argument("--grid", type=int, default=None,
                   help="at most this many candidate λ values (default: every distinct value, exact)")
    p.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stopwise", description=__doc__)
    parser.add_argument("--version", action="version", version=f"stopwise {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("rules", help="list the stopping rules")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rules)

    p = sub.add_parser("calibrate", help="certify a λ on a trace file")
    p.add_argument("trace")
    p.add_argument("--rule", required=True, help="rule name (see `stopwise rules`)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="rule parameter, e.g. window=5")
    p.add_argument("--epsilon", type=float, required=True, help="largest acceptable risk")
    p.add_argument("--method", default="ltt", help="ltt | crc | conditional (default ltt)")
    p.add_argument("--pvalue", default="auto", help="auto | binomial | hoeffding | bentkus | hoeffding_bentkus | wsr")
    p.add_argument("--fwer", default=None, help="fixed_sequence | bonferroni | holm (default: fixed_sequence; holm for selective risk)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", help="write the certificate JSON here")
    _calibration_options(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("report", help="cost-risk Pareto curves (JSON, PNG)")
    p.add_argument("trace")
    p.add_argument("--rules", default="max_prob,margin,entropy,patience", help="comma-separated rule names")
    p.add_argument("--epsilon", type=float, help="also calibrate each rule at this ε and mark the point")
    p.add_argument("--plot", help="write a PNG plot here")
    p.add_argument("-o", "--output", help="write the report JSON here")
    _calibration_options(p)
    p.set_defaults(func=cmd_report, grid=200)

    p = sub.add_parser("check", help="re-measure a certificate on new traces; exit 1 if risk > ε")
    p.add_argument("certificate")
    p.add_argument("trace")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("validate", help="repeat calibration many times on your trace; exit 1 if violations exceed δ")
    p.add_argument("trace")
    p.add_argument("--rule", required=True)
    p.add_argument("--param", action="append", metavar="NAME=VALUE")
    p.add_argument("--epsilon", type=float, required=True)
    p.add_argument("--pvalue", default="auto")
    p.add_argument("--n-cal", type=int, help="calibration split size (default: half the trace)")
    p.add_argument("--repeats", type=int, default=500)
    p.add_argument("--mode", default="bootstrap",
                   help="bootstrap: i.i.d. calibration draws, risk on the whole trace (tests the guarantee exactly); "
                        "split: calibrate on part, measure on the rest (stricter than the guarantee)")
    _calibration_options(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("info", help="describe a trace file")
    p.add_argument("trace")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    for module in ADAPTER_CLIS:
        mod = import_if_present(module)  # None: that adapter is not part of this installation
        if mod is not None:
            mod.register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except StopwiseError as exc:
        print(f"stopwise: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
