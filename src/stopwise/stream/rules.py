"""The stopping rules early classifiers use, as the core's rules.

Every rule that early classification of streams needs is already in the core, so this module adds
no rule class (the registry's plugin list imports it; it registers nothing):

- ``max_prob``: confidence threshold (the prefix classifier's top probability >= λ), as aeon's
  ``ProbabilityThresholdEarlyClassifier``;
- ``margin``: top-1 minus top-2 probability >= λ;
- ``stability``: the prediction unchanged for λ consecutive stages, TEASER's ``v`` (Schäfer &
  Leser 2020) — the core's :class:`~stopwise.Patience`;
- ``combined``: confident and stable: top probability >= λ and the prediction the same as at the
  previous ``stable_stages`` stages (:class:`~stopwise.AllOf` of a free max_prob and a fixed
  patience gate), as ``ProbabilityThresholdEarlyClassifier(consecutive_predictions=...)``.

Each is calibrated by λ alone, so marginal LTT and the conditional (Early Time Classification)
procedure of :func:`stopwise.calibrate` both apply.
"""

from __future__ import annotations

import stopwise as sw
from stopwise._errors import check_choice, check_int

STREAM_RULES = ("max_prob", "margin", "stability", "combined")


def stream_rule(name: str | sw.Rule, *, stable_stages: int = 1) -> sw.Rule:
    """The rule family called ``name`` (one of ``STREAM_RULES``), λ free; a Rule passes through."""
    if isinstance(name, sw.Rule):
        return name
    name = check_choice(name, "rule", "stream_rule", STREAM_RULES)
    stable_stages = check_int(stable_stages, "stable_stages", "stream_rule", minimum=1)
    if name == "max_prob":
        return sw.MaxProb()
    if name == "margin":
        return sw.Margin()
    if name == "stability":
        return sw.Patience()
    return sw.AllOf(sw.MaxProb(), sw.Patience(lam=float(stable_stages)))
