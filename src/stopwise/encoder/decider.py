"""How a lone row decides to exit without a Stopper, and what a certificate's cached rule is made from.

At batch 1 a StageBatch and a Stopper step after every layer cost more than the exit head, so a row
predicted alone under a rule that decides on each stage's probabilities alone uses a decider
instead: the same floats compared the same way, so the row stops at the same layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from stopwise.core.certificate import Certificate
from stopwise.core.rules import Rule
from stopwise.encoder.batches import to_numpy

#: Two-class probabilities that ask a rule whether it has a stage statistic.
_PROBE = np.full((1, 2), 0.5)
_PROBE.flags.writeable = False

#: Softmax outputs a rule's top_prob_band holds for.
_BAND_DTYPES = (torch.float32, torch.float64)


def snapshot(certificate: Certificate) -> tuple[Any, ...]:
    """What a certificate's rule and its check against a model are made from."""
    return (certificate.certified, certificate.lam, certificate.n_stages, certificate.rule, certificate.thresholds,
            certificate.source.get("base_model"), certificate.source.get("heads"))


def lone_row_decider(rule: Rule, n_classes: int) -> Callable[[torch.Tensor], np.ndarray | None] | None:
    """How a lone row decides without a Stopper, or None when the rule needs one (it keeps state
    or reads signals). Each decides on exactly the floats the Stopper compares, so the row stops
    at the same layer; NaN never fires (the comparison is False), as in the Stopper."""
    band = rule.top_prob_band(n_classes)
    if band is not None and band[0] == band[1]:
        top = band[0]

        # The head's largest value, converted to float64, is the Stopper's statistic: only the
        # answering head's probabilities are converted to numpy.
        def on_top(p: torch.Tensor) -> np.ndarray | None:
            return to_numpy(p) if float(p.max()) >= top else None

        return on_top
    # A user's rule may override stage_statistic and still answer None ("any other rule").
    if type(rule).stage_statistic is Rule.stage_statistic or rule.stage_statistic(_PROBE) is None:
        return None
    t, stat, neg = rule.threshold(), rule.stage_statistic, rule.direction < 0
    if t == np.inf:
        return lambda p: None  # +inf never fires, even on a statistic of +inf (as in the Stopper)
    lo, hi = (-np.inf, np.inf) if band is None else band

    def on_statistic(p: torch.Tensor) -> np.ndarray | None:
        if p.dtype in _BAND_DTYPES and p.shape[-1] == n_classes:
            # Outside the band the head's top value settles it (entropy: one max instead of a
            # float64 copy and four numpy calls after every layer). NaN falls through both.
            top = float(p.max())
            if top < lo:
                return None
            if top >= hi:
                return to_numpy(p)
        p64 = to_numpy(p)
        s = stat(p64)[0]  # type: ignore[index]
        return p64 if (s <= -t if neg else s >= t) else None

    return on_statistic
