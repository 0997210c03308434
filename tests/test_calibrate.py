from __future__ import annotations

import json

import numpy as np
import pytest

import stopwise as sw
from stopwise.calibrate import table
from stopwise.synthetic import synthetic_trace


@pytest.fixture(scope="module")
def trace() -> sw.Trace:
    return synthetic_trace(3000, seed=11, with_loss=True)


@pytest.mark.parametrize("rule", [sw.MaxProb(), sw.Entropy(), sw.Patience(), sw.Betting()])
@pytest.mark.parametrize("risk", ["gap", "accuracy_drop", "selective"])
def test_table_equals_brute_force_over_lambda(trace: sw.Trace, rule: sw.Rule, risk: str) -> None:
    small = trace[:400]
    tab = table(small, rule, risk, grid=50)
    loss = sw.make_risk(risk).loss_matrix(small)
    for lam, r, cost, n_eff in zip(tab.lam, tab.risk, tab.cost, tab.n_eff, strict=False):
        halts = rule.halts(small, lam)
        at = loss[np.arange(small.n), halts]
        if risk == "selective":
            early = halts < small.lengths - 1
            assert n_eff == early.sum()
            assert r == pytest.approx(at[early].mean() if early.any() else 0.0)
        else:
            assert r == pytest.approx(at.mean())
        assert cost == pytest.approx(small.cost_at(halts).mean())


def test_table_handles_ragged_traces_and_per_input_costs() -> None:
    rng = np.random.default_rng(0)
    n, k = 300, 6
    lengths = rng.integers(1, k + 1, n)
    mask = np.arange(k)[None] < lengths[:, None]
    cost = np.cumsum(rng.uniform(0.5, 2.0, (n, k)), axis=1)
    probs = rng.dirichlet(np.ones(3), size=(n, k))
    t = sw.Trace(predictions=probs.argmax(2), probs=probs, mask=mask, cost=cost)
    tab = table(t, sw.MaxProb(), grid=30)
    for lam, r, c in zip(tab.lam, tab.risk, tab.cost, strict=False):
        h = sw.MaxProb().halts(t, lam)
        assert r == pytest.approx((t.predictions_at(h) != t.reference).mean())
        assert c == pytest.approx(t.cost_at(h).mean())


def test_certificate_round_trip_rebuilds_the_same_rule(trace: sw.Trace, tmp_path) -> None:
    cert = sw.calibrate(trace, sw.Entropy(normalized=True), epsilon=0.05, delta=0.1)
    assert cert.certified and cert.empirical_risk <= cert.risk_upper_bound <= 0.05 + 1e-9
    assert cert.p_value is not None and cert.p_value <= 0.1
    assert 0 < cert.savings < 1 and cert.oracle_mean_stages <= cert.mean_stages
    path = cert.save(tmp_path / "cert.json")
    back = sw.Certificate.load(path)
    assert back.to_dict() == cert.to_dict()
    np.testing.assert_array_equal(back.make_rule().halts(trace), cert.make_rule().halts(trace))
    checked = back.check(trace)
    assert checked["risk"] == pytest.approx(cert.empirical_risk)
    assert checked["within_epsilon"]
    assert "certified λ" in str(cert) and "exchangeable" in str(cert)


def test_fixed_sequence_picks_the_cheapest_certified_lambda(trace: sw.Trace) -> None:
    cert = sw.calibrate(trace, sw.MaxProb(), epsilon=0.05, delta=0.1, grid=300)
    tab = table(trace, sw.MaxProb(), grid=300)
    p = sw.pvalues.binomial(tab.loss_sum, tab.n_eff, 0.05)
    ok = np.cumprod(p <= 0.1).astype(bool)
    assert cert.n_certified == ok.sum()
    assert cert.lam == pytest.approx(tab.lam[np.flatnonzero(ok)[-1]])


def test_uncertifiable_target_falls_back_to_full_compute(trace: sw.Trace) -> None:
    t = trace[:400]
    cert = sw.calibrate(t, sw.MaxProb(), epsilon=0.006, delta=0.1)  # n_min = 383
    if cert.certified:  # only possible if some λ had zero disagreements
        assert cert.empirical_risk == 0
    hard = sw.Trace(predictions=np.tile([[0, 1]], (400, 1)), probs=np.tile([[[0.99, 0.01], [0.01, 0.99]]], (400, 1, 1)))
    cert = sw.calibrate(hard, sw.MaxProb(), epsilon=0.01, delta=0.1)
    assert not cert.certified and cert.lam is None
    assert isinstance(cert.make_rule(), sw.Never)
    assert cert.savings == 0 and "NOT CERTIFIED" in str(cert)
    assert (cert.make_rule().halts(hard) == 1).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": 0.0}, "'epsilon' parameter of calibrate must be a float in the open interval"),
        ({"epsilon": 1.2}, "'epsilon'"),
        ({"epsilon": 0.05, "delta": 1.0}, "'delta' parameter"),
        ({"epsilon": 0.05, "method": "magic"}, "'method' parameter of calibrate must be one of"),
        ({"epsilon": 0.05, "fwer": "bh"}, "'fwer' parameter"),
        ({"epsilon": 0.05, "pvalue": "t"}, "'pvalue' parameter"),
        ({"epsilon": 0.05, "risk": "rouge"}, "Unknown risk 'rouge'"),
        ({"epsilon": 0.05, "risk": sw.LossMatrix(signal="loss"), "pvalue": "binomial"}, "needs 0/1 losses"),
        ({"epsilon": 0.0005}, "too small: n = 3000, .* needs at least n = 4605"),
    ],
)
def test_bad_calibration_arguments(trace: sw.Trace, kwargs, message) -> None:
    with pytest.raises(sw.StopwiseError, match=message):
        sw.calibrate(trace, sw.MaxProb(), **kwargs)


def test_accuracy_drop_needs_labels() -> None:
    t = sw.Trace(predictions=np.zeros((300, 2), int), probs=np.full((300, 2, 2), 0.5))
    with pytest.raises(sw.StopwiseError, match="needs labels"):
        sw.calibrate(t, sw.MaxProb(), epsilon=0.1, risk="accuracy_drop")


def test_loss_matrix_risk_checks_its_bound(trace: sw.Trace) -> None:
    cert = sw.calibrate(trace, sw.MaxProb(), epsilon=0.05, risk=sw.LossMatrix(signal="loss"))
    assert cert.certified and cert.pvalue == "hoeffding_bentkus"
    bad = sw.LossMatrix(loss=np.full((trace.n, trace.n_stages), 2.0))
    with pytest.raises(sw.StopwiseError, match=r"in \[0, 1\]"):
        sw.calibrate(trace, sw.MaxProb(), epsilon=0.05, risk=bad)
    scaled = sw.LossMatrix(loss=2 * trace.signals["loss"], bound=2.0)
    cert2 = sw.calibrate(trace, sw.MaxProb(), epsilon=0.1, risk=scaled)
    assert cert2.lam == pytest.approx(cert.lam)
    assert cert2.empirical_risk == pytest.approx(2 * cert.empirical_risk)


def test_crc_controls_the_monotonised_risk(trace: sw.Trace) -> None:
    cert = sw.calibrate(trace, sw.MaxProb(), epsilon=0.05, method="crc")
    assert cert.certified and cert.delta is None and "E[risk]" in cert.guarantee
    n = trace.n
    # The certified point satisfies the CRC inequality on the monotone upper bound.
    h = cert.make_rule().halts(trace)
    gap = trace.predictions != trace.reference[:, None]
    settled_later = np.array([gap[i, h[i]:].any() for i in range(n)])
    assert (settled_later.sum() + 1) / (n + 1) <= 0.05
    assert cert.empirical_risk <= settled_later.mean()


def test_conditional_thresholds_control_accumulated_risk_per_stage(trace: sw.Trace) -> None:
    cert = sw.calibrate(trace, sw.MaxProb(), epsilon=0.05, delta=0.1, method="conditional")
    assert cert.certified and cert.thresholds is not None and len(cert.thresholds) == trace.n_stages
    rule = cert.make_rule()
    assert isinstance(rule, sw.StageThresholds)
    back = sw.Certificate.from_json(cert.to_json())
    np.testing.assert_array_equal(back.make_rule().halts(trace), rule.halts(trace))
    fresh = synthetic_trace(20000, seed=999)
    h = rule.halts(fresh)
    gap = fresh.predictions_at(h) != fresh.reference
    for stage in range(fresh.n_stages - 1):
        by = (h <= stage) & (h < fresh.lengths - 1)
        if by.sum() > 200:
            assert gap[by].mean() <= 0.05 + 3 * np.sqrt(0.05 / by.sum())


def test_certificate_json_is_strict_about_garbage(tmp_path) -> None:
    with pytest.raises(sw.StopwiseError, match="invalid JSON"):
        sw.Certificate.from_json("{nope")
    with pytest.raises(sw.StopwiseError, match="missing fields"):
        sw.Certificate.from_json(json.dumps({"rule": {}}))


def test_unknown_certificate_fields_warn_not_crash(trace: sw.Trace) -> None:
    data = sw.calibrate(trace, sw.MaxProb(), epsilon=0.05).to_dict()
    data["from_the_future"] = 1
    with pytest.warns(UserWarning, match="from_the_future"):
        sw.Certificate.from_dict(data)


def test_certificate_refuses_traces_of_another_computation(trace: sw.Trace) -> None:
    tagged = sw.Trace(predictions=trace.predictions, probs=trace.probs, labels=trace.labels, meta={"model": "a"})
    cert = sw.calibrate(tagged, sw.MaxProb(), epsilon=0.05)
    other = sw.Trace(predictions=trace.predictions, probs=trace.probs, meta={"model": "b"})
    with pytest.raises(sw.StopwiseError, match="made for model = 'a'"):
        cert.check(other)
    shorter = synthetic_trace(500, stages=5, seed=1)
    with pytest.raises(sw.StopwiseError, match="8 stages; the trace has 5"):
        cert.check(shorter)


def test_selective_risk_defaults_to_holm(trace: sw.Trace) -> None:
    cert = sw.calibrate(trace, sw.MaxProb(), epsilon=0.05, risk="selective")
    assert cert.fwer == "holm" and cert.certified
    assert sw.calibrate(trace, sw.MaxProb(), epsilon=0.05).fwer == "fixed_sequence"


def test_risk_controller_exposes_the_grid_evidence(trace: sw.Trace) -> None:
    ctl = sw.RiskController(sw.MaxProb(), target_level=0.05, confidence_level=0.9, grid=200)
    with pytest.raises(sw.StopwiseError, match="not been calibrated"):
        _ = ctl.p_values_
    cert = ctl.calibrate(trace)
    assert ctl.lambdas_.size == ctl.p_values_.size == ctl.valid_.size == cert.grid_size
    assert (ctl.p_values_[ctl.valid_] <= 0.1).all()
    assert cert.lam == pytest.approx(ctl.valid_lambdas_[-1])
    assert (np.diff(ctl.lambdas_) <= 0).all()  # conservative (high threshold) first
    assert "evidence" not in cert.to_dict()
    with pytest.raises(sw.StopwiseError, match="'confidence_level' parameter"):
        sw.RiskController(sw.MaxProb(), target_level=0.05, confidence_level=1.0)
