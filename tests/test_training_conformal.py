"""Conformalized early stopping (stopwise.training.conformal), tested like MAPIE: over many random
hold-out / test splits, mean coverage >= 1 - α - z·SE (z = 3.09, one-sided 0.999, SE from the
splits themselves), on real recorded checkpoints and on a synthetic case where the naive choice
(select and calibrate on the same points) breaks the same test; brute-force checks of the
selection and p-values; every bad input raises naming its value."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest

from stopwise.core.errors import StopwiseError
from stopwise.training import ConformalEarlyStopping, ConformalEarlyStoppingRegressor
from stopwise.training.conformal import TIE_TOLERANCE, lower_envelope, min_holdout

DATA = Path(__file__).parent.parent / "benchmarks" / "data"
Z = 3.09


def _lower_bound(coverages: list[float]) -> float:
    cov = np.asarray(coverages)
    return float(cov.mean() + Z * cov.std(ddof=1) / np.sqrt(len(cov)))


def _load(name: str) -> dict[str, np.ndarray]:
    path = DATA / f"training_conformal_{name}.npz"
    if not path.exists():
        pytest.skip(f"{path.name} not recorded (benchmarks/record_conformal_checkpoints.py)")
    with np.load(path) as d:
        return {k: d[k] for k in d.files if k != "meta"}


def _coverage(sets: np.ndarray, labels: np.ndarray) -> float:
    return float(sets[np.arange(len(labels)), labels].mean())


def _random_probs(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.dirichlet(np.ones(shape[-1]) * 0.5, size=shape[:-1])


# ---- validity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_ces_covers_on_real_recorded_checkpoints_and_small_holdout(alpha: float) -> None:
    d = _load("digits")
    probs, labels = d["probs"].astype(np.float64), d["labels"]
    probs /= probs.sum(axis=2, keepdims=True)  # float32 storage: renormalize to float64 sums of 1
    n, cov = 30, []
    for s in range(150):
        perm = np.random.default_rng(s).permutation(len(labels))
        hold, test = perm[:n], perm[n:n + 400]
        model = ConformalEarlyStopping(alpha=alpha).fit(probs[:, hold], labels[hold])
        cov.append(_coverage(model.predict_sets(probs[:, test]), labels[test]))
    assert _lower_bound(cov) >= 1 - alpha
    assert np.mean(cov) < 1 - alpha + 0.05  # not trivially valid by returning every label


def test_naive_selection_breaks_coverage_where_ces_keeps_it() -> None:
    # 100 checkpoints that are pure noise: naive early stopping picks the one that fits the 20
    # hold-out points by luck and then calibrates on those same points.
    n_ckpt, k, n, m, alpha = 100, 3, 20, 100, 0.2
    cov: dict[str, list[float]] = {"ces": [], "naive": [], "split": []}
    for s in range(150):
        rng = np.random.default_rng(s)
        probs, labels = _random_probs(rng, n_ckpt, n + m, k), rng.integers(0, k, n + m)
        for method, out in cov.items():
            model = ConformalEarlyStopping(alpha=alpha, method=method).fit(probs[:, :n], labels[:n])
            out.append(_coverage(model.predict_sets(probs[:, n:]), labels[n:]))
    assert _lower_bound(cov["ces"]) >= 1 - alpha
    assert _lower_bound(cov["split"]) >= 1 - alpha
    assert _lower_bound(cov["naive"]) < 1 - alpha - 0.1


def test_label_conditional_coverage_holds_per_class() -> None:
    n_ckpt, k, n, m, alpha = 30, 3, 60, 150, 0.2
    hits, seen = np.zeros((150, k)), np.zeros((150, k))
    for s in range(150):
        rng = np.random.default_rng(s)
        labels = rng.integers(0, k, n + m)
        # Checkpoints informative for class 0 only: marginal calibration would over-cover it and
        # under-cover the others.
        probs = _random_probs(rng, n_ckpt, n + m, k)
        probs[:, labels == 0] = 0.8 * np.eye(k)[0] + 0.2 * probs[:, labels == 0]
        model = ConformalEarlyStopping(alpha=alpha, coverage="label").fit(probs[:, :n], labels[:n])
        sets = model.predict_sets(probs[:, n:])
        covered = sets[np.arange(m), labels[n:]]
        for y in range(k):
            hits[s, y], seen[s, y] = covered[labels[n:] == y].sum(), (labels[n:] == y).sum()
    for y in range(k):
        assert _lower_bound(list(hits[:, y] / seen[:, y])) >= 1 - alpha


def test_ces_regression_covers_on_real_recorded_checkpoints() -> None:
    d = _load("diabetes")
    preds, targets = d["preds"].astype(np.float64), d["targets"].astype(np.float64)
    alpha, n, cov = 0.1, 60, []
    for s in range(100):
        perm = np.random.default_rng(s).permutation(len(targets))
        hold, test = perm[:n], perm[n:]
        model = ConformalEarlyStoppingRegressor(alpha=alpha).fit(preds[:, hold], targets[hold])
        iv = model.predict_intervals(preds[:, test])
        cov.append(float(((iv[:, 0] <= targets[test]) & (targets[test] <= iv[:, 1])).mean()))
    assert _lower_bound(cov) >= 1 - alpha


def test_naive_regression_breaks_coverage_where_ces_keeps_it() -> None:
    n_ckpt, n, m, alpha = 100, 20, 100, 0.2
    cov: dict[str, list[float]] = {"ces": [], "naive": []}
    for s in range(100):
        rng = np.random.default_rng(s)
        preds, targets = rng.normal(size=(n_ckpt, n + m)), rng.normal(size=n + m)
        for method, out in cov.items():
            model = ConformalEarlyStoppingRegressor(alpha=alpha, method=method).fit(preds[:, :n], targets[:n])
            iv = model.predict_intervals(preds[:, n:])
            out.append(float(((iv[:, 0] <= targets[n:]) & (targets[n:] <= iv[:, 1])).mean()))
    assert _lower_bound(cov["ces"]) >= 1 - alpha
    assert _lower_bound(cov["naive"]) < 1 - alpha - 0.05


# ---- the algorithm, by brute force -----------------------------------------------------------


@pytest.mark.parametrize(("loss", "score", "coverage"), list(itertools.product(
    ["cross_entropy", "brier", "zero_one"], ["lac", "aps"], ["marginal", "label"])))
def test_selection_and_pvalues_match_brute_force(loss: str, score: str, coverage: str) -> None:
    rng = np.random.default_rng(7)
    n_ckpt, n, m, k = 6, 12, 5, 3
    hold, test = _random_probs(rng, n_ckpt, n, k), _random_probs(rng, n_ckpt, m, k)
    labels = np.array([0, 1, 2] * 4)
    alpha = 0.3
    model = ConformalEarlyStopping(alpha=alpha, loss=loss, score=score, coverage=coverage).fit(hold, labels)
    pv = model.pvalues(test)

    def one_loss(p: np.ndarray, y: int) -> float:
        if loss == "cross_entropy":
            return float(-np.log(p[y]))
        if loss == "brier":
            return float(sum((p[j] - (j == y)) ** 2 for j in range(k)))
        return float(np.argmax(p) != y)

    def one_score(p: np.ndarray, y: int) -> float:
        return float(1 - p[y]) if score == "lac" else float(sum(q for q in p if q >= p[y]))

    for j, y in itertools.product(range(m), range(k)):
        augmented = [sum(one_loss(hold[t, i], labels[i]) for i in range(n)) + one_loss(test[t, j], y)
                     for t in range(n_ckpt)]
        t_star = int(np.argmin(augmented))
        assert model.selected_checkpoints_ is not None and model.selected_checkpoints_[j, y] == t_star
        cal = [i for i in range(n) if coverage == "marginal" or labels[i] == y]
        s_test = one_score(test[t_star, j], y)
        count = sum(one_score(hold[t_star, i], labels[i]) >= s_test - TIE_TOLERANCE for i in cal)
        assert pv[j, y] == pytest.approx((1 + count) / (1 + len(cal)))
    assert np.array_equal(model.predict_sets(test), pv > alpha)


def test_ces_equals_naive_with_one_checkpoint_and_where_the_choice_agrees() -> None:
    rng = np.random.default_rng(3)
    hold, test, labels = _random_probs(rng, 8, 40, 4), _random_probs(rng, 8, 30, 4), rng.integers(0, 4, 40)
    ces, naive = ConformalEarlyStopping(alpha=0.1), ConformalEarlyStopping(alpha=0.1, method="naive")
    one = np.array_equal(ces.fit(hold[:1], labels).pvalues(test[:1]), naive.fit(hold[:1], labels).pvalues(test[:1]))
    assert one
    p_ces, p_naive = ces.fit(hold, labels).pvalues(test), naive.fit(hold, labels).pvalues(test)
    assert ces.selected_checkpoints_ is not None
    agree = ces.selected_checkpoints_ == ces.best_checkpoint_
    assert agree.any() and not agree.all()  # the case exercises both branches
    np.testing.assert_array_equal(p_ces[agree], p_naive[agree])
    assert naive.selected_checkpoints_ is not None
    assert (naive.selected_checkpoints_ == naive.best_checkpoint_).all()


def test_split_selects_and_calibrates_on_disjoint_halves() -> None:
    rng = np.random.default_rng(5)
    hold, test, labels = _random_probs(rng, 5, 41, 3), _random_probs(rng, 5, 10, 3), rng.integers(0, 3, 41)
    model = ConformalEarlyStopping(alpha=0.2, method="split", split_fraction=0.5, random_state=1).fit(hold, labels)
    n_cal = 41 - round(0.5 * 41)
    pv = model.pvalues(test)
    np.testing.assert_allclose(pv * (n_cal + 1), np.round(pv * (n_cal + 1)))  # denominators: calibration half
    perm = np.random.default_rng(1).permutation(41)
    select = np.sort(perm[: round(0.5 * 41)])
    ce = -np.log(hold[:, select, labels[select]]).sum(axis=1)
    assert model.best_checkpoint_ == int(ce.argmin())


def test_lower_envelope_matches_brute_force_argmin() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n_ckpt = int(rng.integers(1, 9))
        mu, loss = rng.normal(size=n_ckpt), rng.exponential(size=n_ckpt)
        mu[rng.random(n_ckpt) < 0.3] = mu[0]  # equal predictions: only the lower loss can win
        knots, ckpts = lower_envelope(mu, loss)
        assert len(knots) == len(ckpts) - 1 and np.all(np.diff(knots) > 0)
        ys = rng.normal(scale=4, size=400)
        brute = (loss[:, None] + (ys[None] - mu[:, None]) ** 2).argmin(axis=0)
        assert np.array_equal(ckpts[np.searchsorted(knots, ys)], brute)


def test_regression_interval_is_the_hull_of_the_labels_ces_accepts() -> None:
    rng = np.random.default_rng(2)
    hold, targets, test = rng.normal(size=(6, 30)), rng.normal(size=30), rng.normal(size=(6, 8))
    model = ConformalEarlyStoppingRegressor(alpha=0.2, if_empty="empty").fit(hold, targets)
    iv = model.predict_intervals(test)
    q = np.sort(np.abs(targets[None] - hold), axis=1)[:, int(np.ceil(0.8 * 31)) - 1]
    ys = np.linspace(-8, 8, 40001)
    for j in range(test.shape[1]):
        t_star = (((targets[None] - hold) ** 2).sum(axis=1)[:, None] + (ys[None] - test[:, j, None]) ** 2).argmin(0)
        kept = ys[np.abs(ys - test[t_star, j]) <= q[t_star]]
        assert iv[j, 0] == pytest.approx(kept.min(), abs=1e-3) and iv[j, 1] == pytest.approx(kept.max(), abs=1e-3)


def test_min_holdout_is_ceil_one_over_alpha_minus_one() -> None:
    assert [min_holdout(a) for a in (0.05, 0.1, 0.2, 0.3, 0.5)] == [19, 9, 4, 3, 1]
    # At n = 9 and α = 0.1 the strangest label gets p = 1/10, not > α, and is left out; at n = 8
    # no label could be (p >= 1/9 > α), so fit refuses.
    hold = np.tile([1.0, 0.0], (1, 9, 1))
    test = np.tile([0.0, 1.0], (1, 3, 1))
    sets = ConformalEarlyStopping(alpha=0.1).fit(hold, np.zeros(9, dtype=int)).predict_sets(test)
    assert not sets[:, 0].any() and sets[:, 1].all()
    with pytest.raises(StopwiseError, match=r"needs at least n = ⌈1/α⌉ - 1 = 9 .*Got 8 instead"):
        ConformalEarlyStopping(alpha=0.1).fit(hold[:, :8], np.zeros(8, dtype=int))


# ---- bad input -------------------------------------------------------------------------------


def _ok(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _random_probs(rng, 3, 20, 4), rng.integers(0, 4, 20), _random_probs(rng, 3, 5, 4)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"alpha": 0.0}, r"'alpha' parameter .* open interval \(0, 1\). Got 0.0"),
    ({"alpha": 1.0}, r"'alpha' .* Got 1.0 instead"),
    ({"alpha": "0.1"}, r"'alpha' .* Got '0.1' instead"),
    ({"alpha": float("nan")}, r"'alpha' .* Got nan instead"),
    ({"method": "best"}, r"'method' parameter of ConformalEarlyStopping must be one of .*Got 'best'"),
    ({"loss": "mse"}, r"'loss' .* Got 'mse'"),
    ({"score": "raps"}, r"'score' .* Got 'raps'"),
    ({"coverage": "conditional"}, r"'coverage' .* Got 'conditional'"),
    ({"split_fraction": 1.0}, r"'split_fraction' .* Got 1.0"),
    ({"random_state": -1}, r"'random_state' .* Got -1"),
])
def test_bad_options_raise_naming_the_value(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(StopwiseError, match=match):
        ConformalEarlyStopping(**kwargs)  # type: ignore[arg-type]


def test_bad_arrays_raise_naming_the_value() -> None:
    rng = np.random.default_rng(0)
    hold, labels, test = _ok(rng)
    model = ConformalEarlyStopping(alpha=0.2)
    with pytest.raises(StopwiseError, match=r"not fitted yet. Call 'fit' before 'predict_sets'"):
        model.predict_sets(test)
    bad = hold.copy()
    bad[1, 7, 2] = np.nan
    with pytest.raises(StopwiseError, match=r"'holdout_probs' .* finite everywhere. Got nan at index \(1, 7, 2\)"):
        model.fit(bad, labels)
    bad[1, 7, 2] = np.inf
    with pytest.raises(StopwiseError, match=r"Got inf at index \(1, 7, 2\)"):
        model.fit(bad, labels)
    with pytest.raises(StopwiseError, match=r"'holdout_probs' .* 3-D array. Got an array of shape \(20, 4\)"):
        model.fit(hold[0], labels)
    off = hold.copy()
    off[2, 5] *= 0.9
    with pytest.raises(StopwiseError, match=r"summing to 1 over the last axis. Got a sum of 0.9 at checkpoint 2, point 5"):
        model.fit(off, labels)
    neg = hold.copy()
    neg[0, 3] = [-0.25, 1.25, 0.0, 0.0]  # sums to 1: refused for the negative entry alone
    with pytest.raises(StopwiseError, match=r"probabilities in \[0, 1\]. Got values in \[-0.25, "):
        model.fit(neg, labels)
    with pytest.raises(StopwiseError, match=r"'holdout_labels' .* 20 labels .* Got shape \(19,\)"):
        model.fit(hold, labels[:19])
    for label, shown in ((4, "4"), (-1, "-1"), (1.5, "1.5")):
        wrong = labels.astype(np.float64)
        wrong[3] = label
        with pytest.raises(StopwiseError, match=rf"integer class indices in \[0, 3\]. Got {shown}(\.0)? at index 3"):
            model.fit(hold, wrong)
    with pytest.raises(StopwiseError, match=r"alpha=0.05 needs at least n = ⌈1/α⌉ - 1 = 19 calibration points. Got"
                                            r" 10 instead"):
        ConformalEarlyStopping(alpha=0.05, method="split").fit(hold, labels)
    with pytest.raises(StopwiseError, match=r"needs at least n = ⌈1/α⌉ - 1 = 4 calibration points of every class .*class 1 has the fewest\). Got 1 instead"):
        ConformalEarlyStopping(alpha=0.2, coverage="label").fit(hold, np.r_[np.zeros(17, int), [1, 2, 3]])
    model.fit(hold, labels)
    with pytest.raises(StopwiseError, match=r"'test_probs' .* shape \(3, m, 4\) .* Got shape \(2, 5, 4\)"):
        model.predict_sets(test[:2])
    with pytest.raises(StopwiseError, match=r"'test_probs' .* Got shape \(3, 5, 3\)"):
        model.predict_sets(test[:, :, :3] / test[:, :, :3].sum(axis=2, keepdims=True))


def test_bad_regression_arrays_raise_naming_the_value() -> None:
    rng = np.random.default_rng(0)
    hold, targets = rng.normal(size=(3, 20)), rng.normal(size=20)
    model = ConformalEarlyStoppingRegressor(alpha=0.2)
    with pytest.raises(StopwiseError, match=r"not fitted yet"):
        model.predict_intervals(hold)
    bad = targets.copy()
    bad[4] = np.nan
    with pytest.raises(StopwiseError, match=r"'holdout_targets' .* Got nan at index \(4,\)"):
        model.fit(hold, bad)
    with pytest.raises(StopwiseError, match=r"'holdout_targets' .* 20 targets .* Got shape \(21,\)"):
        model.fit(hold, np.r_[targets, 0.0])
    with pytest.raises(StopwiseError, match=r"needs at least n = ⌈1/α⌉ - 1 = 9 calibration points. Got 5"):
        ConformalEarlyStoppingRegressor(alpha=0.1).fit(hold[:, :5], targets[:5])
    with pytest.raises(StopwiseError, match=r"'if_empty' .* Got 'widest'"):
        ConformalEarlyStoppingRegressor(if_empty="widest")
    model.fit(hold, targets)
    with pytest.raises(StopwiseError, match=r"'test_predictions' .* shape \(3, m\) .* Got shape \(4, 2\)"):
        model.predict_intervals(rng.normal(size=(4, 2)))


def test_docs_example_runs_and_covers(capsys: pytest.CaptureFixture[str]) -> None:
    page = Path(__file__).parent.parent / "docs" / "adapters" / "training.md"
    block = next(b for b in re.findall(r"```python\n(.*?)```", page.read_text(), re.S) if "ConformalEarlyStopping" in b)
    exec(compile(block, str(page), "exec"), {"__name__": "docs_example"})
    found = re.search(r"coverage ([\d.]+), mean set size ([\d.]+)", capsys.readouterr().out)
    assert found is not None
    coverage, size = float(found[1]), float(found[2])
    assert 0.85 < coverage < 0.97 and 0.5 < size < 3
