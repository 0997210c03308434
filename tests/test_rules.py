from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import betainc

import stopwise as sw
from stopwise.rules import RULES, describe_rules, make_rule, rule_from_config
from stopwise.rules.confidence import _entropy_bounds
from stopwise.trace import NO_ANSWER, StageBatch, Trace

# -- random traces for the property tests --------------------------------------------------


@st.composite
def traces(draw: st.DrawFn) -> Trace:
    n = draw(st.integers(1, 12))
    k = draw(st.integers(1, 9))
    c = draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, k + 1, n)
    mask = np.arange(k)[None, :] < lengths[:, None]
    logits = rng.normal(size=(n, k, c)) * draw(st.sampled_from([0.5, 2.0, 6.0]))
    probs = np.exp(logits)
    probs /= probs.sum(axis=2, keepdims=True)
    preds = probs.argmax(axis=2)
    # Sprinkle unparseable answers and repeated predictions so agreement rules fire.
    preds = np.where(rng.random((n, k)) < 0.1, NO_ANSWER, preds)
    sat = rng.random((n, k))
    return Trace(predictions=preds, probs=probs, mask=mask, signals={"saturation": sat})


def all_rules() -> list[sw.Rule]:
    return [
        sw.MaxProb(), sw.Margin(), sw.Entropy(), sw.Entropy(normalized=True), sw.Saturation(),
        sw.Signal(signal="saturation", stop_when="low"), sw.Patience(), sw.WindowAgreement(window=2),
        sw.BetaPosterior(), sw.Betting(), sw.Betting(leader="mode", p0=0.3), sw.Budget(),
        sw.MinStage(sw.MaxProb(), min_stages=2),
        sw.AnyOf(sw.MaxProb(), sw.Budget(lam=3)), sw.AllOf(sw.Margin(), sw.Patience(lam=1)),
        sw.StageThresholds(sw.MaxProb(), thresholds=[0.99, 0.8, 0.6, np.inf, 0.5]),
    ]


def online_halts(trace: Trace, rule: sw.Rule, lam: float | None, *, lams: list[float | None] | None = None
                 ) -> np.ndarray:
    """Feed the trace stage by stage to a shrinking batch, as an adapter would."""
    stopper = rule.stopper(trace.n, lam) if lams is None else rule.stopper(trace.n, lams=lams)
    halts = np.full(trace.n, -1)
    for k in range(trace.n_stages):
        rows = stopper.active
        if rows.size == 0:
            break
        stop = stopper.step(trace.stage(k, rows), last=trace.lengths[rows] - 1 == k)
        halts[rows[stop]] = k
    return halts


@settings(max_examples=60, deadline=None)
@given(trace=traces(), q=st.floats(0.0, 1.0))
def test_online_and_offline_decide_alike(trace: Trace, q: float) -> None:
    for rule in all_rules():
        z = rule.z(trace)
        finite = z[np.isfinite(z)]
        # A λ at an observed value of the statistic exercises ties (>= vs >).
        t = float(np.quantile(finite, q)) if finite.size else 0.0
        lam = rule.lam_from_threshold(t) if rule.free else None
        offline = rule.halts(trace, lam)
        online = online_halts(trace, rule, lam)
        np.testing.assert_array_equal(offline, online, err_msg=repr(rule))
        assert (offline < trace.lengths).all()


@settings(max_examples=40, deadline=None)
@given(trace=traces(), q=st.floats(0.0, 1.0))
def test_stage_statistic_decides_like_the_stopper(trace: Trace, q: float) -> None:
    # Adapters decide a lone row on stage_statistic instead of a Stopper: the same floats, stage
    # by stage, at a λ on an observed value (ties).
    memoryless = [r for r in all_rules() if r.stage_statistic(trace.probs[:, 0]) is not None]
    assert {type(r).__name__ for r in memoryless} == {"MaxProb", "Margin", "Entropy"}
    for rule in all_rules():
        z = rule.z(trace)
        finite = z[np.isfinite(z)]
        lam = rule.lam_from_threshold(float(np.quantile(finite, q)) if finite.size else 0.0) if rule.free else None
        if rule not in memoryless:
            continue
        t = rule.threshold(lam)
        halts = np.empty(trace.n, dtype=np.int64)
        for i in range(trace.n):
            for k in range(trace.lengths[i]):
                s = rule.stage_statistic(trace.probs[i : i + 1, k])
                if k == trace.lengths[i] - 1 or rule.direction * s[0] >= t:
                    halts[i] = k
                    break
        np.testing.assert_array_equal(halts, online_halts(trace, rule, lam), err_msg=repr(rule))


def test_a_subclass_that_rewrites_update_loses_the_shortcuts() -> None:
    class Shifted(sw.MaxProb):
        def update(self, state, batch):  # type: ignore[no-untyped-def]
            state, s = super().update(state, batch)
            return state, s - 0.5

    p = np.array([[0.7, 0.3]])
    assert sw.MaxProb(lam=0.8).top_prob_band(5) == (0.8, 0.8)
    np.testing.assert_array_equal(sw.MaxProb().stage_statistic(p), [0.7])
    # Its update still works through super(), but the shortcuts would describe MaxProb's statistic.
    assert Shifted(lam=0.1).top_prob_band(5) is None and Shifted().stage_statistic(p) is None
    _, s = Shifted().update(None, StageBatch(index=0, predictions=np.array([0]), probs=p))
    np.testing.assert_allclose(s, [0.2])

    class Renamed(sw.Entropy):  # no new update: the shortcuts still hold
        pass

    assert Renamed().stage_statistic(p) is not None


@settings(max_examples=40, deadline=None)
@given(trace=traces())
def test_halts_move_later_as_lambda_gets_more_conservative(trace: Trace) -> None:
    for rule in all_rules():
        if not rule.free:
            continue
        z = rule.z(trace)
        ts = np.unique(np.concatenate([z[np.isfinite(z)], [-np.inf, np.inf]]))
        previous = np.zeros(trace.n, dtype=np.int64)
        for t in ts:
            h = rule.halts(trace, rule.lam_from_threshold(t)) if np.isfinite(t) else None
            if h is None:
                continue
            assert (h >= previous).all(), repr(rule)
            previous = h


@settings(max_examples=30, deadline=None)
@given(trace=traces(), data=st.data())
def test_per_row_thresholds_decide_like_one_stopper_per_row(trace: Trace, data: st.DataObject) -> None:
    """rule.stopper(n, lams=...) stops row i where a scalar stopper with λ = lams[i] stops it,
    while rows drop out of the batch at different stages (None: only the last stage stops)."""
    for rule in all_rules():
        z = rule.z(trace)
        finite = z[np.isfinite(z)]
        qs = data.draw(st.lists(st.floats(0.0, 1.0) | st.none(), min_size=trace.n, max_size=trace.n))
        lams = [None if q is None else rule.lam_from_threshold(float(np.quantile(finite, q)) if finite.size else 0.0)
                for q in qs]
        online = online_halts(trace, rule, None, lams=lams)
        for i, lam in enumerate(lams):
            expected = trace.lengths[i] - 1 if lam is None else online_halts(trace, rule, lam)[i]
            assert online[i] == expected, (repr(rule), i, lam)


def test_per_row_thresholds_validate_their_length() -> None:
    t = toy([[0, 0], [1, 1], [1, 0]], [[[0.9, 0.1]] * 2, [[0.4, 0.6]] * 2, [[0.7, 0.3], [0.2, 0.8]]])
    stopper = sw.MaxProb().stopper(3, lams=[0.8, None, 0.75])
    assert stopper.step(t.stage(0)).tolist() == [True, False, False]
    assert stopper.active.tolist() == [1, 2]
    assert stopper.step(t.stage(1, stopper.active)).tolist() == [False, True]  # row 1 never fires
    np.testing.assert_array_equal(sw.Entropy().stopper(2, lams=[0.5, 0.1]).t, [-0.5, -0.1])
    with pytest.raises(sw.StopwiseError, match="The 'lams' parameter of MaxProb.stopper must be a sequence of 3"):
        sw.MaxProb().stopper(3, lams=[0.5, 0.6])
    with pytest.raises(sw.StopwiseError, match="'lams' parameter"):
        sw.MaxProb().stopper(2, lams=[0.5, float("nan")])
    with pytest.raises(sw.StopwiseError, match="'lams' parameter"):
        sw.MaxProb().stopper(2, lams=0.5)  # type: ignore[arg-type]
    with pytest.raises(sw.StopwiseError, match="not both|Got both"):
        sw.MaxProb().stopper(2, 0.5, lams=[0.5, 0.6])
    with pytest.raises(sw.StopwiseError, match="'t' parameter of Stopper"):
        sw.Stopper(sw.MaxProb(), 3, np.array([0.5, 0.6]))


def toy(preds: list[list[int]], probs: list[list[list[float]]] | None = None) -> Trace:
    return Trace(predictions=np.array(preds), probs=None if probs is None else np.array(probs))


def test_max_prob_margin_entropy_values() -> None:
    t = toy([[0, 1]], [[[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]]])
    np.testing.assert_allclose(sw.MaxProb().z(t), [[0.7, 0.5]])
    np.testing.assert_allclose(sw.Margin().z(t), [[0.5, 0.1]])
    h = -(np.array([0.7, 0.2, 0.1]) * np.log([0.7, 0.2, 0.1])).sum()
    np.testing.assert_allclose(-sw.Entropy().z(t)[0, 0], h)
    np.testing.assert_allclose(-sw.Entropy(normalized=True).z(t)[0, 0], h / np.log(3))
    assert sw.MaxProb().halts(t, 0.6).tolist() == [0]
    assert sw.MaxProb().halts(t, 0.8).tolist() == [1]  # never fires: last stage
    assert sw.Entropy().halts(t, h + 1e-9).tolist() == [0]


def _float32_softmax(c: int, scale: float, seed: int, n: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, c)) * scale).astype(np.float32)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True, dtype=np.float32)).astype(np.float64)  # as a float32 head gives them


@settings(max_examples=300, deadline=None)
@given(c=st.integers(2, 60), scale=st.sampled_from([0.01, 1.0, 5.0, 30.0, 200.0]), seed=st.integers(0, 2**31 - 1),
       normalized=st.booleans())
def test_entropy_bounds_from_the_top_value_hold_on_float32_softmax(c: int, scale: float, seed: int,
                                                                   normalized: bool) -> None:
    p = _float32_softmax(c, scale, seed)
    for row, h in zip(p, sw.Entropy(normalized=normalized).stage_statistic(p), strict=True):
        bounds = _entropy_bounds(float(row.max()), c, normalized)
        assert bounds is not None
        assert bounds[0] <= h <= bounds[1]


@settings(max_examples=300, deadline=None)
@given(c=st.integers(2, 60), scale=st.sampled_from([0.01, 1.0, 3.0, 5.0, 30.0]), seed=st.integers(0, 2**31 - 1),
       normalized=st.booleans(), q=st.floats(0.0, 1.0))
def test_the_entropy_band_on_the_top_value_decides_as_the_entropy(c: int, scale: float, seed: int, normalized: bool,
                                                                  q: float) -> None:
    p = _float32_softmax(c, scale, seed, n=64)
    rule = sw.Entropy(normalized=normalized)
    h = rule.stage_statistic(p)
    lam = float(np.quantile(h, q))  # a threshold among the rows' own entropies: both sides occur
    band = rule.top_prob_band(c, lam)
    assert band is not None
    a, b = band
    assert a < b
    top = p.max(axis=1)
    assert np.all(h[top < a] > lam)  # not stopped below the band
    assert np.all(h[top >= b] <= lam)  # stopped above it


def test_the_entropy_band_is_narrow_and_belongs_to_the_statistic() -> None:
    rule = sw.Entropy()
    for c, lam in ((5, 0.1427), (5, 0.5), (2, 0.05), (40, 1.0)):
        a, b = rule.top_prob_band(c, lam)
        assert 1.0 / c <= a < b <= 1.0
        # Just outside the band the bounds settle it; just inside they no longer do.
        assert _entropy_bounds(a, c, False)[0] > lam >= _entropy_bounds(b, c, False)[1]
        assert _entropy_bounds(a + 3e-7, c, False)[0] <= lam < _entropy_bounds(b - 3e-7, c, False)[1]
    lo, hi = _entropy_bounds(1.0, 5, False)
    assert lo <= 0.0 <= hi < 1e-4
    lo, hi = _entropy_bounds(0.2, 5, False)
    assert np.log(5) - 1e-5 < lo <= np.log(5) <= hi < np.log(5) + 1e-5
    assert _entropy_bounds(float("nan"), 5, False) is None and _entropy_bounds(0.0, 5, False) is None
    # Below 0 no entropy qualifies and above log C every one does: no band, the exact path.
    assert rule.top_prob_band(5, -0.1) is None and rule.top_prob_band(5, 2.0) is None
    assert rule.top_prob_band(1, 0.1) is None and sw.Margin().top_prob_band(5, 0.1) is None

    class Doubled(sw.Entropy):  # another statistic: the entropy's band no longer applies
        def stage_statistic(self, probs: np.ndarray) -> np.ndarray:
            return 2 * super().stage_statistic(probs)

    assert Doubled().top_prob_band(5, 0.1) is None


def test_patience_counts_unchanged_predictions_like_pabee() -> None:
    t = toy([[3, 1, 1, 1, 2, 2]])
    np.testing.assert_array_equal(sw.Patience().z(t), [[0, 0, 1, 2, 0, 1]])
    assert sw.Patience().halts(t, 2).tolist() == [3]
    assert sw.Patience().halts(t, 3).tolist() == [5]


def test_esc_checks_only_at_window_ends() -> None:
    t = toy([[5, 5, 5, 5, 1, 5]])
    z = sw.WindowAgreement(window=3).z(t)
    assert np.isneginf(z[0, [0, 1, 3, 4]]).all()
    np.testing.assert_allclose(z[0, [2, 5]], [1.0, 2 / 3])
    assert sw.WindowAgreement(window=3).halts(t, 1.0).tolist() == [2]


def test_esc_unparseable_answers_never_agree() -> None:
    t = toy([[NO_ANSWER, NO_ANSWER, 4, 4]])
    z = sw.WindowAgreement(window=2).z(t)
    np.testing.assert_allclose(z[0, [1, 3]], [0.0, 1.0])


def test_beta_posterior_matches_adaptive_consistency_formula() -> None:
    t = toy([[1, 1, 2, 1, 3, 1]])
    z = sw.BetaPosterior().z(t)
    counts = [(1, 0), (2, 0), (2, 1), (3, 1), (3, 1), (4, 1)]
    expected = [1 - betainc(a + 1, b + 1, 0.5) for a, b in counts]
    np.testing.assert_allclose(z[0], expected)


def test_betting_wealth_and_ville_threshold() -> None:
    t = toy([[2, 2, 2, 2, 2, 2]])
    rule = sw.Betting(p0=0.5, kappa=1.0)
    # Each agreement multiplies wealth by 1 + 1 * (1 - 0.5) = 1.5.
    np.testing.assert_allclose(-rule.z(t)[0], [1.0] + [1.5 ** -k for k in range(1, 6)])
    # 1.5^k >= 1/0.2 = 5 first at k = 4 (stage index 4).
    assert rule.halts(t, 0.2).tolist() == [4]


def test_betting_never_fires_on_a_fair_coin_more_than_alpha() -> None:
    rng = np.random.default_rng(0)
    # Under the null (agreement with the previous stage has probability 1/2) the sup of the
    # wealth crosses 1/alpha with probability <= alpha (Ville), even with 64 looks.
    preds = rng.integers(0, 2, size=(4000, 64))
    t = Trace(predictions=preds)
    fired = sw.Betting(p0=0.5).halts(t, 0.1) < 63
    assert fired.mean() <= 0.1 + 3 * np.sqrt(0.1 * 0.9 / 4000)


def test_budget_min_stage_and_combinations() -> None:
    t = toy([[0, 0, 0, 0]], [[[0.99, 0.01]] * 4])
    assert sw.Budget().halts(t, 3).tolist() == [2]
    assert sw.MinStage(sw.MaxProb(), min_stages=3).halts(t, 0.9).tolist() == [2]
    assert sw.AnyOf(sw.MaxProb(lam=0.999), sw.Budget()).halts(t, 2).tolist() == [1]
    assert sw.AllOf(sw.MaxProb(), sw.Budget(lam=4)).halts(t, 0.5).tolist() == [3]


def test_uncalibrated_rule_without_lambda_says_how_to_get_one() -> None:
    t = toy([[0, 0]], [[[0.9, 0.1]] * 2])
    with pytest.raises(sw.StopwiseError, match="has no λ"):
        sw.MaxProb().halts(t)
    assert sw.MaxProb(lam=0.5).halts(t).tolist() == [0]


def test_stopper_rejects_wrong_batch_sizes_and_stage_order() -> None:
    t = toy([[0, 0], [1, 1]], [[[0.9, 0.1]] * 2, [[0.4, 0.6]] * 2])
    stopper = sw.MaxProb().stopper(2, 0.8)
    assert stopper.step(t.stage(0)).tolist() == [True, False]
    with pytest.raises(sw.StopwiseError, match="rows still running"):
        stopper.step(t.stage(1))
    with pytest.raises(sw.StopwiseError, match="stage 1 next"):
        stopper.step(t.stage(0, np.array([1])))


def test_stopper_never_fires_on_nan_or_an_infinite_threshold() -> None:
    batch = StageBatch(index=0, predictions=np.zeros(3, dtype=np.int64),
                       signals={"s": np.array([np.inf, np.nan, 0.5])})
    rule = sw.Signal(signal="s")
    # Per-row thresholds: +inf never fires, even at z = +inf; NaN never fires; 0.5 >= 0.4 does.
    assert sw.Stopper(rule, 3, np.array([np.inf, 0.1, 0.4])).step(batch).tolist() == [False, False, True]
    assert sw.Stopper(rule, 3, np.inf).step(batch).tolist() == [False, False, False]
    assert sw.Stopper(rule, 3, np.inf).step(batch, last=True).tolist() == [True, True, True]


def test_rules_need_their_inputs() -> None:
    t = toy([[0, 1]])
    with pytest.raises(sw.StopwiseError, match="needs class probabilities"):
        sw.MaxProb().halts(t, 0.5)
    with pytest.raises(sw.StopwiseError, match="needs the signal 'saturation'"):
        sw.Saturation().halts(t, 0.5)


def test_registry_configs_round_trip_and_unknown_names() -> None:
    for rule in all_rules():
        back = rule_from_config(rule.to_config())
        assert repr(back) == repr(rule)
    with pytest.raises(sw.StopwiseError, match="Unknown rule 'nope'"):
        make_rule("nope")
    names = {row["name"] for row in describe_rules()}
    assert names == set(RULES)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: sw.WindowAgreement(window=0), "'window' parameter"),
        (lambda: sw.Betting(p0=1.5), "'p0' parameter"),
        (lambda: sw.Betting(leader="x"), "'leader' parameter"),
        (lambda: sw.Signal(signal="s", stop_when="up"), "'stop_when' parameter"),
        (lambda: sw.MinStage(sw.MaxProb(), min_stages=0), "'min_stages' parameter"),
        (lambda: sw.MaxProb(lam="high"), "'lam' parameter"),
        (lambda: sw.AnyOf(sw.MaxProb(), sw.Entropy()), "one direction"),
    ],
)
def test_bad_rule_parameters(factory, message) -> None:
    with pytest.raises(sw.StopwiseError, match=message):
        factory()


def test_register_rule_adds_a_user_rule_and_refuses_silent_overrides() -> None:
    class LastProb(sw.Rule):
        """Stop when the predicted class's probability is >= λ (a user rule)."""

        name = "test_last_prob"
        default_lam = 0.5

        def update(self, state, batch):
            return state, batch.probs[np.arange(len(batch.predictions)), batch.predictions]

    try:
        assert sw.register_rule(LastProb) is LastProb
        rule = make_rule("test_last_prob", lam=0.7)
        assert isinstance(rule, LastProb) and rule_from_config(rule.to_config()).lam == 0.7

        class Other(LastProb):
            pass

        with pytest.raises(sw.StopwiseError, match="already registered as 'test_last_prob'"):
            sw.register_rule(Other)
        sw.register_rule(Other, replace=True)
        assert RULES["test_last_prob"] is Other
        with pytest.raises(sw.StopwiseError, match="'cls' parameter of register_rule"):
            sw.register_rule(int)  # type: ignore[arg-type]
    finally:
        RULES.pop("test_last_prob", None)


def test_adapter_rules_load_by_name_without_importing_the_adapter() -> None:
    """A certificate naming a sampling rule must rebuild it in a fresh process."""
    import subprocess
    import sys

    code = ("import sys, stopwise as sw; r = sw.make_rule('vote_settled', lam=0.9); "
            "print(type(r).__module__, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["stopwise.sampling.rules", "False"]


def _never_before_last() -> list[sw.Rule]:
    return [
        sw.Never(), sw.MaxProb(lam=1.01), sw.Entropy(lam=-0.1), sw.Patience(lam=3), sw.Patience(lam=2.5),
        sw.MinStage(sw.Patience(), min_stages=5, lam=1), sw.MinStage(sw.MaxProb(), min_stages=2, lam=1.5),
        sw.StageThresholds(sw.Patience(), thresholds=[np.inf, 5, 2, 2]),
        sw.StageThresholds(sw.Entropy(), thresholds=[-np.inf, -np.inf]),
    ]


@settings(max_examples=40, deadline=None)
@given(trace=traces(), q=st.floats(0.0, 1.0))
def test_no_rule_fires_before_its_earliest_stop(trace: Trace, q: float) -> None:
    for rule in all_rules() + _never_before_last():
        z = rule.z(trace)
        finite = z[np.isfinite(z)]
        lam = rule.lam_from_threshold(float(np.quantile(finite, q)) if finite.size else 0.0) if rule.free else None
        earliest = rule.earliest_stop(lam)
        fires = z >= rule.threshold(lam)
        assert not fires[:, : min(trace.n_stages, int(earliest)) if np.isfinite(earliest) else None].any(), repr(rule)


def test_earliest_stop_is_tight_where_a_rule_knows_it() -> None:
    probs = np.tile(np.array([0.7, 0.2, 0.1]), (1, 6, 1))
    same = Trace(predictions=np.zeros((1, 6), dtype=np.int64), probs=probs)
    expected = [
        (sw.Patience(lam=3), 3.0), (sw.Patience(lam=2.5), 3.0), (sw.Patience(lam=0), 0.0), (sw.MaxProb(lam=0.7), 0.0),
        (sw.MinStage(sw.Patience(), min_stages=5, lam=1), 4.0),
        (sw.StageThresholds(sw.Patience(), thresholds=[np.inf, 5, 2, 2]), 2.0),
    ]
    for rule, stage in expected:
        assert rule.earliest_stop() == stage, repr(rule)
        assert rule.halts(same)[0] == stage, repr(rule)  # a trace that fires as soon as it can
    for rule in _never_before_last()[:3] + _never_before_last()[-1:]:
        assert rule.earliest_stop() == np.inf, repr(rule)
        assert rule.halts(same)[0] == 5, repr(rule)
    with pytest.raises(sw.StopwiseError, match="has no λ"):
        sw.MaxProb().earliest_stop()
