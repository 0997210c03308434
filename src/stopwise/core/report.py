"""Cost-risk Pareto curves for several rules at once, with the oracle and certified points."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stopwise.core.calibrate import calibrate
from stopwise.core.certificate import Certificate
from stopwise.core.measure import oracle_halts, table
from stopwise.core.risks import Risk, make_risk
from stopwise.core.rules import Rule
from stopwise.core.trace import Trace


def pareto(
    trace: Trace,
    rules: Sequence[Rule],
    *,
    risk: Risk | str = "gap",
    epsilon: float | None = None,
    delta: float = 0.1,
    grid: int = 200,
    certificates: Sequence[Certificate] | None = None,
) -> dict[str, Any]:
    """Empirical risk and mean cost over each rule's λ grid, the oracle, and certified points.

    With ``epsilon`` set, each rule is also calibrated on this trace (LTT, fixed sequence) and
    its certified point is reported; pass ``certificates`` instead to mark existing ones.
    """
    risk_obj = make_risk(risk)
    loss = risk_obj.loss_matrix(trace)
    oracle = oracle_halts(loss, trace.lengths)
    full = float(trace.full_cost.mean())
    out: dict[str, Any] = {
        "n": trace.n,
        "n_stages": trace.n_stages,
        "risk": risk_obj.name,
        "full_cost": full,
        "oracle": {
            "cost": float(trace.cost_at(oracle).mean()),
            "mean_stages": float(oracle.mean() + 1),
            "risk": float(loss[np.arange(trace.n), oracle].mean()),
        },
        "rules": [],
    }
    certs = list(certificates or [])
    for i, rule in enumerate(rules):
        tab = table(trace, rule, risk_obj, grid=grid, loss=loss)
        row: dict[str, Any] = {
            "rule": repr(rule.with_lam(None)),
            "lam": tab.lam.tolist(),
            "risk": tab.risk.tolist(),
            "cost": tab.cost.tolist(),
            "mean_stages": tab.mean_stages.tolist(),
        }
        cert = certs[i] if i < len(certs) else None
        if cert is None and epsilon is not None:
            cert = calibrate(trace, rule, epsilon=epsilon, delta=delta, risk=risk_obj)
        if cert is not None:
            row["certified"] = {
                "certified": cert.certified,
                "lam": cert.lam,
                "risk": cert.empirical_risk,
                "cost": cert.expected_cost,
                "epsilon": cert.epsilon,
                "delta": cert.delta,
            }
        out["rules"].append(_finite(row))
    return out


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """JSON cannot hold inf: λ = ±inf (never/always stop) becomes null."""
    row["lam"] = [x if np.isfinite(x) else None for x in row["lam"]]
    return row


def plot_pareto(result: dict[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Write the Pareto curves as a PNG: mean cost (x) against empirical risk (y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    full = result["full_cost"]
    for row in result["rules"]:
        (line,) = ax.plot(np.asarray(row["cost"]) / full, row["risk"], lw=1.5, label=row["rule"])
        cert = row.get("certified")
        if cert and cert["certified"]:
            ax.scatter([cert["cost"] / full], [cert["risk"]], color=line.get_color(), marker="*", s=140, zorder=5,
                       edgecolor="black", label=f"certified (λ={cert['lam']:.3g})")
    oracle = result["oracle"]
    ax.scatter([oracle["cost"] / full], [oracle["risk"]], color="black", marker="D", s=50, zorder=6, label="oracle")
    eps = next((r["certified"]["epsilon"] for r in result["rules"] if r.get("certified")), None)
    if eps is not None:
        ax.axhline(eps, color="grey", ls="--", lw=1, label=f"ε = {eps:g}")
    ax.set_xlabel("mean cost / full cost")
    ax.set_ylabel(f"empirical risk ({result['risk']})")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"stopwise cost-risk trade-off (n = {result['n']}, {result['n_stages']} stages)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
