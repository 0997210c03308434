"""Gradient-boosted regression trees in numpy: a learned statistic a rule can carry in its params.

Squared-loss gradient boosting (Friedman 2001, "Greedy function approximation: a gradient boosting
machine") with histogram split finding on per-feature quantile bins, as in LightGBM (Ke et al.
2017) and scikit-learn's ``HistGradientBoostingRegressor``. Each tree is a complete binary tree of
a fixed depth held in three arrays (split feature, threshold, leaf value), so a model is a few
lists of numbers inside a certificate's JSON, and one vectorised function predicts offline over a
whole trace and online for one row. No randomness: the same data give the same trees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from stopwise.core.errors import StopwiseError, check_int, param_error

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

__all__ = ["BoostedTrees", "fit_boosted_trees"]


def _check_x(x: Any, n_features: int | None, owner: str) -> FloatArray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or (n_features is not None and arr.shape[1] != n_features):
        want = "(rows, features)" if n_features is None else f"(rows, {n_features})"
        raise StopwiseError(f"The 'x' parameter of {owner} must have shape {want}. Got shape {arr.shape} instead.")
    if not np.isfinite(arr).all():
        row, col = (int(v) for v in np.argwhere(~np.isfinite(arr))[0])
        raise StopwiseError(f"The 'x' parameter of {owner} must be finite. Got {arr[row, col]} at row {row}, feature {col}.")
    return arr


@dataclass(frozen=True)
class BoostedTrees:
    """A fitted ensemble: ``predict(x) = base + learning_rate * sum over trees of a leaf value``.

    ``features`` / ``thresholds`` are (trees, 2**depth - 1) in breadth-first node order (children of
    node i are 2i + 1, going left when ``x[feature] <= threshold``, and 2i + 2); a threshold of
    +inf sends every row left (a node that found no split). ``leaves`` is (trees, 2**depth).
    """

    base: float
    learning_rate: float
    features: IntArray
    thresholds: FloatArray
    leaves: FloatArray
    n_features: int

    @property
    def depth(self) -> int:
        return int(round(math.log2(self.leaves.shape[1])))

    def predict(self, x: Any) -> FloatArray:
        """One value per row of the (rows, n_features) matrix ``x``."""
        arr = _check_x(x, self.n_features, "BoostedTrees.predict")
        n, trees = arr.shape[0], self.leaves.shape[0]
        out = np.full(n, self.base)
        if trees == 0 or n == 0:
            return out
        tree = np.arange(trees)[None, :]
        rows = np.arange(n)[:, None]
        node = np.zeros((n, trees), dtype=np.int64)
        for _ in range(self.depth):
            f = self.features[tree, node]
            node = 2 * node + 1 + (arr[rows, f] > self.thresholds[tree, node])
        out += self.learning_rate * self.leaves[tree, node - (self.leaves.shape[1] - 1)].sum(axis=1)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able params; an infinite threshold (no split) is written as null."""
        return {"base": self.base, "learning_rate": self.learning_rate, "n_features": self.n_features,
                "features": self.features.tolist(),
                "thresholds": [[None if math.isinf(t) else t for t in row] for row in self.thresholds.tolist()],
                "leaves": self.leaves.tolist()}

    @classmethod
    def from_dict(cls, body: Any) -> BoostedTrees:
        """Rebuild from :meth:`to_dict`; raises naming the key that does not fit."""
        if not isinstance(body, dict):
            raise StopwiseError(f"BoostedTrees.from_dict needs a dict from to_dict(). Got {type(body).__name__} instead.")
        missing = sorted({"base", "learning_rate", "n_features", "features", "thresholds", "leaves"} - set(body))
        if missing:
            raise StopwiseError(f"The boosted-trees params lack {missing}. Got keys {sorted(body)}.")
        n_features = check_int(body["n_features"], "n_features", "BoostedTrees", minimum=1)
        try:
            feats = np.asarray(body["features"], dtype=np.int64)
            thr = np.asarray([[math.inf if t is None else t for t in row] for row in body["thresholds"]], dtype=np.float64)
            leaves = np.asarray(body["leaves"], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise StopwiseError(f"The boosted-trees params hold a value that is not a number: {exc}.") from None
        trees = leaves.shape[0] if leaves.ndim == 2 else -1
        width = leaves.shape[1] if leaves.ndim == 2 else 0
        if trees < 0 or width < 2 or width & (width - 1) or not np.isfinite(leaves).all():
            raise param_error("leaves", "BoostedTrees", "a (trees, 2**depth) matrix of finite numbers", body["leaves"])
        for key, arr in (("features", feats), ("thresholds", thr)):
            if arr.size != trees * (width - 1) or (arr.size and arr.shape != (trees, width - 1)):
                raise param_error(key, "BoostedTrees", f"a ({trees}, {width - 1}) matrix (one per split node)", body[key])
        feats, thr = feats.reshape(trees, width - 1), thr.reshape(trees, width - 1)
        if feats.size and (feats.min() < 0 or feats.max() >= n_features):
            raise param_error("features", "BoostedTrees", f"feature indices in [0, {n_features})", body["features"])
        if np.isnan(thr).any():
            raise param_error("thresholds", "BoostedTrees", "numbers or null (no split)", body["thresholds"])
        for key in ("base", "learning_rate"):
            value = body[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise param_error(key, "BoostedTrees", "a finite number", value)
        return cls(base=float(body["base"]), learning_rate=float(body["learning_rate"]), features=feats,
                   thresholds=thr, leaves=leaves, n_features=n_features)


def _bin_edges(x: FloatArray, bins: int) -> list[FloatArray]:
    """Per feature, the candidate thresholds: distinct inner quantiles (at most ``bins`` - 1)."""
    qs = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    out = []
    for j in range(x.shape[1]):
        edges = np.unique(np.quantile(x[:, j], qs))
        out.append(edges[edges < x[:, j].max()])  # a threshold at the maximum splits nothing off
    return out


def fit_boosted_trees(x: Any, y: Any, *, rounds: int = 100, depth: int = 3, learning_rate: float = 0.1,
                      min_leaf: int = 20, l2: float = 1.0, bins: int = 32) -> BoostedTrees:
    """Fit squared-loss boosted trees of ``depth`` on ``x`` (rows, features) and targets ``y``.

    Each round fits one tree to the residuals: every node takes the (feature, quantile threshold)
    that most reduces the squared error, ``S_L^2 / (n_L + l2) + S_R^2 / (n_R + l2) - S^2 / (n + l2)``
    for residual sums S, with at least ``min_leaf`` rows per side; leaves hold ``S / (n + l2)``,
    added with ``learning_rate`` shrinkage."""
    owner = "fit_boosted_trees"
    arr = _check_x(x, None, owner)
    target = np.asarray(y, dtype=np.float64)
    if target.shape != (arr.shape[0],) or not np.isfinite(target).all():
        raise param_error("y", owner, f"{arr.shape[0]} finite numbers (one per row of x)", y)
    rounds = check_int(rounds, "rounds", owner, minimum=0)
    depth = check_int(depth, "depth", owner, minimum=1)
    min_leaf = check_int(min_leaf, "min_leaf", owner, minimum=1)
    bins = check_int(bins, "bins", owner, minimum=2)
    for key, value in (("learning_rate", learning_rate), ("l2", l2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                or (key == "learning_rate" and value == 0):
            raise param_error(key, owner, "a positive finite number" if key == "learning_rate" else "a finite number >= 0",
                              value)
    if arr.shape[0] < 2 * min_leaf:
        raise StopwiseError(f"{owner} needs at least 2 * min_leaf = {2 * min_leaf} rows to split. Got {arr.shape[0]}.")
    n, d = arr.shape
    edges = _bin_edges(arr, bins)
    # One bin column per feature, offset so that a single bincount histograms all features at once.
    sizes = np.array([e.size + 1 for e in edges])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    binned = np.stack([np.searchsorted(e, arr[:, j], side="left") for j, e in enumerate(edges)], axis=1) + offsets
    feat_of_bin = np.repeat(np.arange(d), sizes)
    last_of_feature = np.zeros(int(sizes.sum()), dtype=bool)
    last_of_feature[offsets + sizes - 1] = True
    base = float(target.mean())
    pred = np.full(n, base)
    inner, width = 2**depth - 1, 2**depth
    all_f = np.zeros((rounds, inner), dtype=np.int64)
    all_t = np.full((rounds, inner), math.inf)
    all_v = np.zeros((rounds, width))
    for t in range(rounds):
        resid = target - pred
        node = np.zeros(n, dtype=np.int64)
        for i in range(inner):
            rows = np.flatnonzero(node == i)
            split = _best_split(binned[rows], resid[rows], sizes, offsets, feat_of_bin, last_of_feature,
                                min_leaf=min_leaf, l2=float(l2))
            if split is not None:
                j, b = split
                all_f[t, i], all_t[t, i] = j, float(edges[j][b])
            node[rows] = 2 * i + 1 + (arr[rows, all_f[t, i]] > all_t[t, i])
        leaf = node - inner
        s = np.bincount(leaf, weights=resid, minlength=width)
        c = np.bincount(leaf, minlength=width)
        all_v[t] = s / (c + l2 + 1e-12)
        pred += learning_rate * all_v[t, leaf]
    return BoostedTrees(base=base, learning_rate=float(learning_rate), features=all_f, thresholds=all_t,
                        leaves=all_v, n_features=d)


def _best_split(binned: IntArray, resid: FloatArray, sizes: IntArray, offsets: IntArray, feat_of_bin: IntArray,
                last_of_feature: npt.NDArray[np.bool_], *, min_leaf: int, l2: float) -> tuple[int, int] | None:
    """(feature, bin) of the best split of these rows, or None when no split gains."""
    n = resid.size
    if n < 2 * min_leaf:
        return None
    total = int(sizes.sum())
    s = np.bincount(binned.ravel(), weights=np.repeat(resid, binned.shape[1]), minlength=total)
    c = np.bincount(binned.ravel(), minlength=total).astype(np.float64)
    # Running sums within each feature: left side of a split after bin b holds bins 0..b.
    cs, cc = np.cumsum(s), np.cumsum(c)
    start_s = np.repeat(cs[offsets] - s[offsets], sizes)
    start_c = np.repeat(cc[offsets] - c[offsets], sizes)
    sl, nl = cs - start_s, cc - start_c
    s_all, sr, nr = resid.sum(), resid.sum() - sl, n - nl
    gain = sl**2 / (nl + l2) + sr**2 / (nr + l2) - s_all**2 / (n + l2)
    ok = (nl >= min_leaf) & (nr >= min_leaf) & ~last_of_feature
    if not ok.any():
        return None
    gain = np.where(ok, gain, -np.inf)
    best = int(np.argmax(gain))  # first maximum: ties go to the lowest feature, then the lowest bin
    if not gain[best] > 1e-12 * max(1.0, float((resid**2).sum())):
        return None
    j = int(feat_of_bin[best])
    return j, best - int(offsets[j])
