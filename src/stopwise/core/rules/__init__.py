"""Stopping rules and their registry by name (used by the CLI and by certificates)."""

from __future__ import annotations

from typing import Any

from stopwise.core.errors import StopwiseError
from stopwise.core.plugins import import_if_present
from stopwise.core.rules.agreement import BetaPosterior, Betting, Patience, WindowAgreement
from stopwise.core.rules.base import Rule, Stopper, halts_from_z
from stopwise.core.rules.compose import AllOf, AnyOf, Budget, MinStage, Never, StageThresholds
from stopwise.core.rules.confidence import Entropy, Margin, MaxProb, Saturation, Signal

RULES: dict[str, type[Rule]] = {
    cls.name: cls
    for cls in (
        MaxProb, Margin, Entropy, Signal, Saturation, Patience, WindowAgreement, BetaPosterior,
        Betting, Budget, Never, AnyOf, AllOf, MinStage, StageThresholds,
    )
}

_NESTED = {"rule", "rules"}

# Adapter modules that register rules of their own; pure numpy, imported only when a name is
# unknown, so that a saved certificate naming e.g. "vote_settled" loads without the user
# importing the adapter first.
RULE_PLUGINS = ("stopwise.sampling.rules", "stopwise.training.rules", "stopwise.stream.rules", "stopwise.encoder.gate")


def register_rule(cls: type[Rule], *, replace: bool = False) -> type[Rule]:
    """Add a rule class to the registry under ``cls.name`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Rule)):
        raise StopwiseError(f"The 'cls' parameter of register_rule must be a Rule subclass. Got {cls!r} instead.")
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name:
        raise StopwiseError(f"The rule class {cls.__name__} needs a non-empty string 'name' to be registered.")
    if RULES.get(name, cls) is not cls and not replace:
        raise StopwiseError(f"A different rule is already registered as {name!r} ({RULES[name].__name__}); "
                            "pass replace=True to override it.")
    RULES[name] = cls
    return cls


def _load_plugins() -> None:
    for module in RULE_PLUGINS:
        import_if_present(module)  # an absent adapter's rules stay unknown; a broken one raises


def make_rule(name: str, **params: Any) -> Rule:
    """Build a rule from its registry name, e.g. ``make_rule("entropy", normalized=True)``."""
    if name not in RULES:
        _load_plugins()
    if name not in RULES:
        raise StopwiseError(f"Unknown rule {name!r}. Known rules: {sorted(RULES)} (see `stopwise rules`).")
    try:
        return RULES[name](**params)
    except TypeError as exc:
        raise StopwiseError(f"Bad parameters {params!r} for rule {name!r}: {exc}") from None


def rule_from_config(config: dict[str, Any]) -> Rule:
    """Inverse of :meth:`Rule.to_config`."""
    params = dict(config.get("params") or {})
    for key in _NESTED & params.keys():
        value = params[key]
        params[key] = [rule_from_config(v) for v in value] if isinstance(value, list) else rule_from_config(value)
    name = config.get("name", "")
    lam = config.get("lam")
    if name in ("any_of", "all_of"):
        return RULES[name](*params.pop("rules"), lam=lam)  # built-in: no plugin lookup needed
    return make_rule(name, lam=lam, **params)


def _fires_when(cls: type[Rule]) -> str:
    direction = getattr(cls, "direction", 1)
    if not isinstance(direction, int) or issubclass(cls, Signal) and cls is Signal:
        return "per wrapped rule" if not isinstance(direction, int) else "per stop_when"
    return "statistic <= lam" if direction < 0 else "statistic >= lam"


def describe_rules() -> list[dict[str, Any]]:
    """Name, summary, direction and default λ of every registered rule (for `stopwise rules`)."""
    _load_plugins()
    out = []
    for name, cls in sorted(RULES.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        out.append({
            "name": name,
            "class": cls.__name__,
            "summary": doc,
            "fires_when": _fires_when(cls),
            "integer_lam": cls.integer if isinstance(cls.integer, bool) else "per wrapped rule",
            "default_lam": cls.default_lam,
        })
    return out


__all__ = [
    "RULES", "AllOf", "AnyOf", "BetaPosterior", "Betting", "Budget", "Entropy", "Margin", "MaxProb",
    "MinStage", "Never", "Patience", "Rule", "Saturation", "Signal", "StageThresholds", "Stopper",
    "WindowAgreement", "describe_rules", "halts_from_z", "make_rule", "register_rule", "rule_from_config",
]
