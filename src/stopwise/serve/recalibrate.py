"""Online recalibration with a live certificate for ``stopwise serve encoder``.

A small random share of the texts (``shadow_rate``, each text independently, seeded RNG, at most
``max_shadow_per_batch`` per batch) is *shadowed*: the model thread records it through every layer
right after its batch's live rows and answers it with the final layer, so a shadowed text's answer
is exactly the full model's. Its trace (every exit's prediction, the final layer as the reference)
joins a sliding window of the last ``window`` shadowed texts. No labels are needed: the risk is
the gap, disagreement with the full model, which the final layer defines.

After each shadowed batch the *current* λ is tested on the window: the exact binomial p-value of
"gap(λ) > ε" for that single λ (the test LTT runs per λ; Angelopoulos et al., "Learn then Test",
2021). If the window is full (``window`` rows, and at least the rows that could certify anything
at level δ) and the p-value exceeds δ (the total; certificates are issued at δ_r <= δ, so a λ is not revoked by the
noise of the next window), the window no longer certifies λ; and at any size,
when its disagreements already show gap(λ) > ε (binomial tail P(X >= k | n, ε) <= δ, a test of
drift). Either way a **fallback** runs at once,
calibrating on the window (and going to the full model when nothing certifies or the window is
too small). Otherwise a scheduled recalibration runs every ``every`` new shadowed texts (or
``every_s`` seconds with at least one new one). Each calibration is a Learn-then-Test run
(:func:`stopwise.calibrate`, fixed-sequence, risk ``"gap"``) on the window, and its certificate
replaces the policy atomically (a new certificate id) from the next batch on.

What the online guarantee covers, exactly:

- Recalibration ``r`` (1, 2, ...) tests at ``δ_r = δ · 6 / (π² r²)``, so over every recalibration
  of the server's life the δ spent sums to at most ``δ`` (Σ 6 / (π² r²) = 1). With probability at
  least ``1 - δ``, *every* certificate issued online has gap ≤ ε on the distribution its window
  was drawn from. The check that triggers a fallback spends nothing: failing it only makes the
  policy safer (more layers), and passing it keeps a certificate already issued.
- That is a promise about the next requests only if the stream is stationary over the window
  (the window's texts exchangeable with the next ones). Drift faster than the window fills is not
  covered: until enough shadowed texts of the new source arrive, the window still speaks for the
  old one. The reaction time is a number of *shadowed* texts, i.e. about 1 / shadow_rate times as
  many requests' texts.
- Shadowed texts are answered by the full model, so their answers are exact; the guarantee is
  about the others. The reference is the model's own final layer: label errors of the full
  model are not covered (the gap says nothing about accuracy).
- Power, and what the δ-spending costs: LTT at ε certifies nothing on fewer than
  ``min_calibration_size(ε, δ_r)`` rows, which grows as δ_r shrinks (ε = 0.01, δ = 0.1: 279 rows at
  r = 1, 498 at r = 3, 737 at r = 10), and a λ whose true gap is a little under ε needs a window
  several times larger to be certified again. A window too small for ε falls back to the full
  model (safe, no savings); size it for the recalibrations expected (the default 2,000 rows
  allows r up to ~5,000 at ε = 0.01, δ = 0.1: 1,196 rows at r = 100, 2,112 at r = 10^4).
- The certificate the server started with (offline calibration) keeps its own offline guarantee
  and δ; the online δ-spending starts at the first online recalibration.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import binom

from stopwise._errors import StopwiseError, check_int, check_open_unit
from stopwise.core.calibrate import calibrate
from stopwise.core.certificate import Certificate
from stopwise.core.errors import CalibrationError
from stopwise.core.pvalues import binomial, min_calibration_size
from stopwise.core.risks import make_risk
from stopwise.core.rules import Rule, make_rule
from stopwise.core.trace import Trace

LOG = logging.getLogger("stopwise.serve")


def delta_spent(delta: float, r: int) -> float:
    """δ_r = δ · 6 / (π² r²), the level of recalibration ``r`` (1-based): Σ_r δ_r = δ."""
    if r < 1:
        raise StopwiseError(f"The 'r' parameter of delta_spent must be an integer >= 1. Got {r!r} instead.")
    return float(delta) * 6.0 / (math.pi ** 2 * r * r)


@dataclass(frozen=True)
class Event:
    """One recalibration or fallback, as logged and kept in :attr:`Recalibrator.events`."""

    kind: str  # "recalibration" or "fallback"
    r: int  # recalibration number (its δ is delta_spent(delta, r)); 0 when nothing was calibrated
    delta_r: float
    window_n: int
    lam_before: float | None
    lam_after: float | None  # None: the full model
    certified: bool
    window_gap_before: float  # the window's gap at the λ in use before the event
    p_value_before: float | None
    reason: str
    at: float


@dataclass(frozen=True)
class Decision:
    """What the server swaps in: ``certificate`` (None: the full model) and why."""

    certificate: Certificate | None
    event: Event


class Recalibrator:
    """Shadow traffic, a sliding window of full traces, and scheduled LTT recalibration with fallback.

    See the module docstring for the guarantee. ``rule`` is a rule family (its λ is calibrated);
    ``every`` counts new shadowed texts between scheduled recalibrations, ``every_s`` (optional)
    seconds. Everything here runs in the model thread; the counters are read by /metrics.
    """

    def __init__(self, *, rule: Rule | str = "max_prob", epsilon: float = 0.01, delta: float = 0.1,
                 shadow_rate: float = 0.05, window: int = 2000, every: int = 200, every_s: float | None = None,
                 max_shadow_per_batch: int = 8, seed: int = 0, grid: int | None = None) -> None:
        owner = "Recalibrator"
        self.rule = make_rule(rule) if isinstance(rule, str) else rule
        if not isinstance(self.rule, Rule):
            raise StopwiseError(f"The 'rule' parameter of {owner} must be a rule name or a stopwise Rule. "
                                f"Got {type(rule).__name__} instead.")
        self.epsilon = check_open_unit(epsilon, "epsilon", owner)
        self.delta = check_open_unit(delta, "delta", owner)
        self.shadow_rate = check_open_unit(shadow_rate, "shadow_rate", owner)
        self.window_size = check_int(window, "window", owner, minimum=2)
        self.every = check_int(every, "every", owner, minimum=1)
        if every_s is not None and (isinstance(every_s, bool) or not isinstance(every_s, (int, float))
                                    or not every_s > 0):
            raise StopwiseError(f"The 'every_s' parameter of {owner} must be a positive number or None. "
                                f"Got {every_s!r} instead.")
        self.every_s = None if every_s is None else float(every_s)
        self.max_shadow_per_batch = check_int(max_shadow_per_batch, "max_shadow_per_batch", owner, minimum=1)
        self.grid = grid
        self._rng = np.random.default_rng(seed)
        self._risk = make_risk("gap")
        self.window: Trace | None = None
        self.shadowed = 0  # texts shadowed so far
        self.since = 0  # shadowed texts since the last calibration
        self.last_at = time.monotonic()
        self.recalibrations = 0  # r of the last online calibration
        self.fallbacks = 0
        self.spent = 0.0  # Σ δ_r so far, always < delta
        self.window_gap = float("nan")  # the window's gap at the λ in use (NaN: no window yet)
        self.window_p = float("nan")
        self.certified = False  # whether the policy in use is a certified early-exit rule
        self.events: deque[Event] = deque(maxlen=100)

    # -- shadowing ----------------------------------------------------------------------------
    def choose(self, n: int) -> np.ndarray:
        """Which of a batch's ``n`` texts to shadow: Bernoulli(shadow_rate) each, at most the cap."""
        pick = self._rng.random(n) < self.shadow_rate
        chosen = np.flatnonzero(pick)
        if chosen.size > self.max_shadow_per_batch:  # bounded work per batch: keep a uniform subset
            pick[:] = False
            pick[self._rng.choice(chosen, self.max_shadow_per_batch, replace=False)] = True
        return pick

    def start(self, certificate: Certificate | None) -> None:
        """Record what the server starts with (the offline certificate, or None: the full model)."""
        self.certified = certificate is not None and bool(certificate.certified)

    # -- evidence -----------------------------------------------------------------------------
    def test(self, certificate: Certificate, window: Trace) -> tuple[float, float]:
        """The window's gap at the certificate's λ, and the binomial p-value of "gap > ε" at that λ."""
        halts = certificate.make_rule().halts(window)
        loss = self._risk.loss_matrix(window)[np.arange(window.n), halts]
        return float(loss.mean()), float(binomial(np.asarray(float(loss.sum())), window.n, self.epsilon))

    def observe(self, trace: Trace, certificate: Certificate | None) -> Decision | None:
        """Add a batch's shadow traces; return a new policy when a fallback or a recalibration is due."""
        if trace.n == 0:
            return None
        merged = trace if self.window is None else Trace.concat([self.window, trace])
        self.window = merged[max(0, merged.n - self.window_size):] if merged.n > self.window_size else merged
        self.shadowed += trace.n
        self.since += trace.n
        lam = None if certificate is None else certificate.lam
        p: float | None = None
        if certificate is None or not certificate.certified:
            self.window_gap, self.window_p = 0.0, float("nan")  # the full model: no gap by definition
        else:
            self.window_gap, p = self.test(certificate, self.window)
            self.window_p = p
            # Revoked at the total δ, issued at δ_r <= δ: a λ certified at δ_r is not revoked by the
            # noise of the next window (a λ at the edge of its window would otherwise flap).
            level = self.delta
            # Below this size zero disagreements would not certify either: the window cannot judge yet
            # whether λ is certified, but it can already show that λ's gap exceeds ε (drift).
            n, k = self.window.n, int(round(self.window_gap * self.window.n))
            exceeded = float(binom.sf(k - 1, n, self.epsilon)) if k > 0 else 1.0
            # Lack of evidence is judged on a full window only: a part-filled one just above the
            # minimum size certifies nothing with a single disagreement, so on a stationary stream
            # it would revoke a λ for want of power, not for evidence (the drift test acts at once).
            full = n >= self.window_size and n >= min_calibration_size(self.epsilon, level, "binomial")
            if full and p > level:
                reason = (f"the window's {n} shadowed texts no longer certify λ = {lam:.4g} "
                          f"(gap {self.window_gap:.4f}, p = {p:.3g} > δ = {level:.3g})")
                return self._calibrate("fallback", lam, p, reason)
            if exceeded <= level:
                reason = (f"the window's {n} shadowed texts show λ = {lam:.4g}'s gap above ε = {self.epsilon:g} "
                          f"({k} disagreements, P(>= {k} | gap = ε) = {exceeded:.3g} <= δ = {level:.3g})")
                return self._calibrate("fallback", lam, p, reason)
        due = self.since >= self.every or (self.every_s is not None and time.monotonic() - self.last_at >= self.every_s)
        if due:
            return self._calibrate("recalibration", lam, p, f"{self.since} new shadowed texts")
        return None

    def _calibrate(self, kind: str, lam: float | None, p: float | None, reason: str) -> Decision | None:
        assert self.window is not None
        gap_before = self.window_gap
        r = self.recalibrations + 1
        delta_r = delta_spent(self.delta, r)
        try:
            cert: Certificate | None = calibrate(self.window, self.rule, epsilon=self.epsilon, delta=delta_r,
                                                 risk="gap", grid=self.grid)
        except CalibrationError as exc:  # too few rows to certify anything at δ_r: nothing was tested
            if kind == "recalibration":
                self.since, self.last_at = 0, time.monotonic()
                LOG.info("stopwise: recalibration skipped: %s", exc)
                return None
            cert, r, delta_r = None, 0, 0.0
            reason += f"; {exc}"
        else:
            self.recalibrations, self.spent = r, self.spent + delta_r
        self.since, self.last_at = 0, time.monotonic()
        if cert is not None and not cert.certified:
            cert = None  # nothing certifies on the window: the full model, exact
        self.certified = cert is not None
        if kind == "fallback":
            self.fallbacks += 1
        new_lam = None if cert is None else cert.lam
        event = Event(kind, r, delta_r, self.window.n, lam, new_lam, cert is not None, gap_before, p, reason,
                      time.time())
        self.events.append(event)
        if cert is not None:
            self.window_gap, self.window_p = self.test(cert, self.window)
        else:
            self.window_gap, self.window_p = 0.0, float("nan")
        target = "the full model" if cert is None else f"λ = {new_lam:.4g}"
        if kind == "fallback":
            LOG.warning("stopwise: FALLBACK to %s: %s (recalibration %d, δ_r = %.3g)", target, reason, r, delta_r)
        else:
            LOG.info("stopwise: recalibrated to %s on %d shadowed texts (recalibration %d, δ_r = %.3g)",
                     target, self.window.n, r, delta_r)
        return Decision(cert, event)

    # -- exposition ---------------------------------------------------------------------------
    def metric_lines(self, prefix: str = "stopwise") -> list[str]:
        """Prometheus lines for /metrics (names as issue 41 gives them)."""
        rows = (
            ("recalibrations_total", "counter", self.recalibrations, "Online LTT recalibrations run (r)."),
            ("fallbacks_total", "counter", self.fallbacks,
             "Fallbacks: the window no longer certified the lambda in use."),
            ("policy_certified", "gauge", int(self.certified),
             "1 when an early-exit rule certified on the window (or offline) is in use, 0 for the full model."),
            ("window_traces", "gauge", 0 if self.window is None else self.window.n,
             "Shadowed texts in the sliding window."),
            ("window_capacity", "gauge", self.window_size, "Most shadowed texts the window keeps."),
            ("shadow_rate", "gauge", self.shadow_rate, "Share of texts shadowed through every layer."),
            ("shadow_texts_total", "counter", self.shadowed, "Texts shadowed (answered by the full model)."),
            ("window_gap", "gauge", self.window_gap, "The window's measured gap at the lambda in use."),
            ("window_p_value", "gauge", self.window_p, "Binomial p-value of gap > epsilon at the lambda in use."),
            ("epsilon", "gauge", self.epsilon, "The gap the online certificates bound."),
            ("delta_spent", "gauge", self.spent, "Sum of delta_r over the recalibrations so far (<= delta)."),
        )
        out: list[str] = []
        for name, kind, value, text in rows:
            v = float(value)
            shown = "NaN" if math.isnan(v) else (str(int(v)) if v.is_integer() else repr(v))
            out += [f"# HELP {prefix}_{name} {text}", f"# TYPE {prefix}_{name} {kind}", f"{prefix}_{name} {shown}"]
        return out

    def status(self) -> dict[str, Any]:
        """A JSON summary (for /health and the benchmark)."""
        out: dict[str, Any] = _finite({"recalibrations": self.recalibrations, "fallbacks": self.fallbacks,
                        "certified": self.certified, "window": 0 if self.window is None else self.window.n,
                        "shadowed": self.shadowed, "shadow_rate": self.shadow_rate, "window_gap": self.window_gap,
                        "delta_spent": self.spent, "epsilon": self.epsilon, "delta": self.delta,
                        "events": [asdict(e) for e in list(self.events)[-10:]]})
        return out


def _finite(value: Any) -> Any:
    """NaN becomes None: JSON (and Starlette's JSONResponse) has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
