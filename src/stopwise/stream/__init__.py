"""Early classification of time series and text streams with a certificate (``stopwise.stream``).

Stages are prefixes; a prefix classifier (:class:`SeriesPrefixes` for series, one per prefix
length as TEASER / ECEC; :class:`TextPrefixes` for texts read word by word) gives probabilities at
each; a core rule (confidence, margin, stability, or a combination) stops, calibrated marginally by
Learn-then-Test and per stopping time by Early Time Classification (Ringel, Romano et al. 2024).

    >>> from stopwise.stream import EarlyStreamClassifier, SeriesPrefixes
    >>> model = EarlyStreamClassifier(SeriesPrefixes(n_stages=20), epsilon=0.05).fit(X, y)  # doctest: +SKIP
    >>> model.predict(X_new), model.earliness_                                                # doctest: +SKIP
    >>> stream = model.stream(); decision = stream.update(chunk)                             # doctest: +SKIP

No torch at import; scikit-learn and aeon are imported when first needed.
"""

from __future__ import annotations

from stopwise.stream.metrics import accuracy, earliness, erde, erde_macro, harmonic_mean
from stopwise.stream.model import Decision, Decisions, EarlyStreamClassifier, Stream, decide_stage
from stopwise.stream.prefix import PrefixModel, SeriesPrefixes, flat_estimator, prefix_lengths
from stopwise.stream.rules import STREAM_RULES, stream_rule
from stopwise.stream.text import TextPrefixes

__all__ = [
    "STREAM_RULES", "Decision", "Decisions", "EarlyStreamClassifier", "PrefixModel", "SeriesPrefixes", "Stream",
    "TextPrefixes", "accuracy", "decide_stage", "earliness", "erde", "erde_macro", "flat_estimator",
    "harmonic_mean", "prefix_lengths", "stream_rule",
]
