"""Online recalibration (stopwise.serve.recalibrate) with a fake classifier whose layer agreement we control.

The fake has 4 layers and 3 classes. Before a drift, an early layer that is confident (top
probability >= 0.70) agrees with the final layer; a less confident one agrees half the time. After
``drift = True`` every early layer is confidently wrong, so a certified max_prob λ stops being safe.
One test at the end repeats the serving path on the real MiniLM (marked ``model``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import zlib
from typing import Any

import numpy as np
import pytest

import stopwise as sw
from stopwise.serve.recalibrate import Recalibrator, delta_spent

K, C = 4, 3


def fake_trace(texts: list[str], drift: bool) -> sw.Trace:
    n = len(texts)
    preds = np.zeros((n, K), np.int64)
    probs = np.zeros((n, K, C))
    for i, text in enumerate(texts):
        rng = np.random.default_rng(zlib.crc32(text.encode()))
        y = int(rng.integers(C))
        u, coin = rng.random(K), rng.random(K) < 0.5
        for k in range(K - 1):
            conf = 0.34 + 0.66 * u[k]
            agree = not drift and (conf >= 0.70 or coin[k])
            preds[i, k] = y if agree else (y + 1) % C
            probs[i, k] = (1 - conf) / 2
            probs[i, k, preds[i, k]] = conf
        preds[i, -1] = y
        probs[i, -1] = 0.05
        probs[i, -1, y] = 0.9
    return sw.Trace(predictions=preds, probs=probs, meta={"model": "fake"})


class Pred:
    def __init__(self, predictions: Any, probs: Any, exit_layer: Any, cost: Any) -> None:
        self.predictions, self.probs, self.exit_layer, self.cost = predictions, probs, exit_layer, cost


class FakeTokenizer:
    def __call__(self, texts: list[str], *, truncation: bool, max_length: int, add_special_tokens: bool) -> Any:
        return {"input_ids": [[0] * min(len(t.split()) + 2, max_length) for t in texts]}


class FakeClassifier:
    class_names = ("a", "b", "c")
    max_length = 64
    base_name = "fake"

    def __init__(self) -> None:
        self.tokenizer = FakeTokenizer()
        self.drift = False
        self.recorded: list[str] = []
        self.live: list[str] = []

    def check_certificate(self, certificate: Any) -> None:
        pass

    def predict(self, texts: list[str], *, certificate: Any = None, batch_size: int = 32) -> Pred:
        self.live += texts
        t = fake_trace(texts, self.drift)
        halts = np.full(t.n, K - 1) if certificate is None else certificate.make_rule().halts(t)
        rows = np.arange(t.n)
        return Pred(t.predictions[rows, halts], t.probs[rows, halts], halts + 1, (halts + 1).astype(float))

    def record(self, texts: list[str], labels: Any = None, *, batch_size: int = 32, progress: bool = True) -> sw.Trace:
        self.recorded += texts
        return fake_trace(texts, self.drift)


def texts_(prefix: str, n: int) -> list[str]:
    return [f"{prefix} text number {i}" for i in range(n)]


def feed(recal: Recalibrator, texts: list[str], drift: bool, cert: Any, batch: int = 10) -> tuple[Any, list[Any]]:
    """Run a stream through ``recal`` the way the server does; return the final certificate and the decisions."""
    decisions = []
    for start in range(0, len(texts), batch):
        chunk = texts[start:start + batch]
        pick = recal.choose(len(chunk))
        if pick.any():
            d = recal.observe(fake_trace([t for t, s in zip(chunk, pick, strict=True) if s], drift), cert)
            if d is not None:
                decisions.append(d)
                cert = d.certificate
    return cert, decisions


def test_delta_spending_sums_to_at_most_delta() -> None:
    assert sum(delta_spent(0.1, r) for r in range(1, 200_000)) <= 0.1
    assert sum(delta_spent(0.1, r) for r in range(1, 200_000)) > 0.0999  # and is not needlessly small
    recal = Recalibrator(epsilon=0.05, delta=0.1, shadow_rate=0.9, window=300, every=20, seed=1)
    _, decisions = feed(recal, texts_("s", 3000), False, None)
    assert recal.recalibrations >= 50
    assert [d.event.delta_r for d in decisions] == [delta_spent(0.1, d.event.r) for d in decisions]
    assert [d.event.r for d in decisions] == list(range(1, len(decisions) + 1))
    assert recal.spent == pytest.approx(sum(d.event.delta_r for d in decisions)) and recal.spent <= 0.1


def test_shadow_rate_is_respected_and_capped() -> None:
    recal = Recalibrator(shadow_rate=0.05, max_shadow_per_batch=32, seed=3)
    n = sum(int(recal.choose(32).sum()) for _ in range(1000))
    expected, sd = 32_000 * 0.05, math.sqrt(32_000 * 0.05 * 0.95)
    assert abs(n - expected) < 4 * sd
    capped = Recalibrator(shadow_rate=0.5, max_shadow_per_batch=3, seed=3)
    counts = [int(capped.choose(32).sum()) for _ in range(200)]
    assert max(counts) == 3
    with pytest.raises(sw.StopwiseError, match="'shadow_rate' parameter of Recalibrator"):
        Recalibrator(shadow_rate=1.0)


def test_recalibration_certifies_then_drift_makes_the_fallback_fire(caplog: pytest.LogCaptureFixture) -> None:
    recal = Recalibrator(epsilon=0.05, delta=0.1, shadow_rate=0.5, window=300, every=100, seed=0)
    cert, decisions = feed(recal, texts_("before", 800), False, None)
    # The cheapest certified λ sits at the edge of what its window certified, so on a stationary
    # stream a later window may not certify it either: that fallback moves to a nearby safer λ.
    assert decisions and decisions[0].event.kind == "recalibration"
    assert all(d.certificate is not None for d in decisions)
    assert cert is not None and cert.certified and recal.certified
    assert 0.6 < cert.lam < 0.75  # the confident early layers are safe; the others are not
    assert cert.check(fake_trace(texts_("heldout", 4000), False))["risk"] <= 0.05
    shadowed = recal.shadowed
    with caplog.at_level(logging.WARNING, logger="stopwise.serve"):
        cert2, after = feed(recal, texts_("after", 400), True, cert)
    fallbacks = [d for d in after if d.event.kind == "fallback"]
    assert fallbacks, "drift never triggered the fallback"
    first = fallbacks[0].event
    # The λ in use sat at the edge of what the window certified: a handful of drifted rows tip it.
    assert first.window_n == 300 and recal.fallbacks >= 1
    assert first.lam_before == cert.lam and first.p_value_before is not None and first.p_value_before > 0.0
    assert any("FALLBACK" in r.message for r in caplog.records)
    assert recal.shadowed > shadowed
    # What the window certifies once it has drifted is safe on the drifted stream (or the full model).
    assert cert2 is None or cert2.check(fake_trace(texts_("heldout", 4000), True))["risk"] <= 0.05


def test_fallback_reacts_within_a_few_shadowed_texts() -> None:
    recal = Recalibrator(epsilon=0.05, delta=0.1, shadow_rate=0.5, window=300, every=100, seed=0)
    cert, _ = feed(recal, texts_("before", 800), False, None)
    start = recal.shadowed
    for i in range(200):
        d = recal.observe(fake_trace([f"drift {i}"], True), cert)
        if d is not None and d.event.kind == "fallback":
            break
    else:
        pytest.fail("no fallback in 200 drifted shadow texts")
    # Each drifted text stopping early is a disagreement; the window's bound crosses ε within ~30.
    assert recal.shadowed - start <= 30
    assert d.certificate is None or d.certificate.lam > cert.lam


def test_a_part_filled_window_never_revokes_for_want_of_power(caplog: pytest.LogCaptureFixture) -> None:
    """On a stationary stream, a certified λ (true gap 0.047 < ε = 0.05) is judged "no longer
    certified" only on a full window; a part-filled one only acts on evidence of drift."""
    cert = sw.calibrate(fake_trace(texts_("off1", 3000), False), sw.make_rule("max_prob"), epsilon=0.05,
                        delta=0.1, risk="gap")
    assert cert.check(fake_trace(texts_("heldout", 20000), False))["risk"] < 0.05

    def revoked(window: int, seed: int) -> int:
        recal = Recalibrator(epsilon=0.05, delta=0.1, shadow_rate=0.9, window=window, every=10**6, seed=seed)
        _, decisions = feed(recal, texts_(f"stat{seed}", 1500), False, cert)
        return sum("no longer certify" in d.event.reason for d in decisions)

    with caplog.at_level(logging.ERROR, logger="stopwise.serve"):
        assert [revoked(2000, s) for s in range(10)] == [0] * 10  # ~1,350 rows: never full
        assert sum(revoked(150, s) for s in range(10)) > 0  # full windows of 150 rows do judge it


def test_online_certificates_hold_over_many_streams() -> None:
    """MAPIE-style: over independent stationary streams, the share with any issued λ whose true gap
    exceeds ε stays below δ (+ binomial slack); accepting the window's empirical gap instead fails."""
    population = fake_trace(texts_("population", 8000), False)
    rule = sw.make_rule("max_prob")
    eps, delta, runs = 0.05, 0.2, 60
    bad, naive_bad = 0, 0
    for seed in range(runs):
        recal = Recalibrator(epsilon=eps, delta=delta, shadow_rate=0.9, window=120, every=60, seed=seed)
        _, decisions = feed(recal, texts_(f"stream{seed}", 400), False, None, batch=20)
        lams = [d.certificate.lam for d in decisions if d.certificate is not None]
        bad += any(sw.evaluate(population, rule, lam=lam)["risk"] > eps for lam in lams)
        window = recal.window
        assert window is not None
        grid = np.unique(rule.z(window))
        ok = [t for t in grid if sw.evaluate(window, rule, lam=t)["risk"] <= eps]
        naive_bad += bool(ok) and sw.evaluate(population, rule, lam=min(ok))["risk"] > eps
    slack = 3 * math.sqrt(delta * (1 - delta) / runs)
    assert bad / runs <= delta + slack
    assert naive_bad / runs > delta + slack  # the naive choice, tested the same way, fails


# -- over HTTP ----------------------------------------------------------------------------------
fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from stopwise.serve.app import create_app  # noqa: E402
from stopwise.serve.runner import ServerThread  # noqa: E402


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def post_all(url: str, groups: list[list[str]]) -> list[Any]:
    async def go() -> list[Any]:
        async with httpx.AsyncClient(timeout=30) as client:
            out = []
            for i in range(0, len(groups), 8):  # 8 requests at a time: batches form, the stream stays ordered
                out += await asyncio.gather(*(client.post(url, json={"texts": g}) for g in groups[i:i + 8]))
            return out
    return asyncio.run(go())


def test_server_recalibrates_swaps_and_falls_back_in_metrics() -> None:
    clf = FakeClassifier()
    recal = Recalibrator(epsilon=0.05, delta=0.1, shadow_rate=0.5, window=300, every=100, seed=0)
    app = create_app(clf, None, max_batch_size=16, max_wait_ms=2, recalibrator=recal)
    with ServerThread(app) as server:
        url = server.url
        before = httpx.get(f"{url}/metrics").text
        assert metric(before, "stopwise_policy_certified") == 0 and metric(before, "stopwise_shadow_rate") == 0.5
        post_all(f"{url}/v1/classify", [texts_(f"b{i}", 4) for i in range(150)])
        health = httpx.get(f"{url}/health").json()
        first_id, first_lam = health["certificate_id"], health["lambda"]
        assert first_id is not None and 0.6 < first_lam < 0.75
        post_all(f"{url}/v1/classify", [texts_(f"c{i}", 4) for i in range(60)])
        health = httpx.get(f"{url}/health").json()
        assert health["certificate_id"] not in (None, first_id)  # a new window, a new certificate
        mid = httpx.get(f"{url}/metrics").text
        assert metric(mid, "stopwise_recalibrations_total") >= 2 and metric(mid, "stopwise_policy_certified") == 1
        assert metric(mid, "stopwise_window_traces") == 300
        mid_lam = health["lambda"]
        assert metric(mid, "stopwise_serve_lambda") == mid_lam
        clf.drift = True
        clf.recorded.clear()
        answers = post_all(f"{url}/v1/classify", [texts_(f"d{i}", 4) for i in range(100)])
        after = httpx.get(f"{url}/metrics").text
        health = httpx.get(f"{url}/health").json()
    assert metric(after, "stopwise_fallbacks_total") > metric(mid, "stopwise_fallbacks_total")
    assert health["recalibration"]["events"][-1]["kind"] in ("fallback", "recalibration")
    # Safer: a larger λ (more layers), or the full model (λ NaN in /metrics, None in /health).
    assert health["lambda"] is None or health["lambda"] > mid_lam
    lam_now = metric(after, "stopwise_serve_lambda")
    assert math.isnan(lam_now) if health["lambda"] is None else lam_now == health["lambda"]
    assert metric(after, "stopwise_policy_certified") == (health["lambda"] is not None)
    # Shadowed texts were answered by the full model even while early exits were confidently wrong.
    rows = {t: r for a in answers for t, r in zip(_texts(a), a.json()["results"], strict=True)}
    full = fake_trace(clf.recorded, True)
    assert clf.recorded
    for text, y in zip(clf.recorded, full.predictions[:, -1], strict=True):
        assert rows[text]["label_id"] == int(y) and rows[text]["exit_layer"] == K


def _texts(response: Any) -> list[str]:
    import json

    return list(json.loads(response.request.content)["texts"])


@pytest.mark.model
def test_minilm_shadowed_answers_equal_the_full_model() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import warnings

    from stopwise.encoder import EarlyExitClassifier
    from stopwise.encoder.data import bbc_news

    torch.set_num_threads(2)
    data = bbc_news()
    rows = np.random.default_rng(0).permutation(len(data))
    train, test = data.take(rows[:60]), data.take(rows[60:92])
    clf = EarlyExitClassifier.from_base("minilm", class_names=train.class_names, max_length=24)
    recorded: list[str] = []
    record = clf.record

    def spy(texts: list[str], *args: Any, **kwargs: Any) -> Any:
        recorded.extend(texts)
        return record(texts, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(train.texts, train.labels, progress=False, epochs=30)
        clf.record = spy  # type: ignore[method-assign]
        recal = Recalibrator(epsilon=0.2, delta=0.2, shadow_rate=0.5, window=64, every=1000, seed=0)
        app = create_app(clf, None, max_batch_size=8, max_wait_ms=50, recalibrator=recal)
        texts = list(test.texts)
        with ServerThread(app) as server:
            answers = [httpx.post(f"{server.url}/v1/classify", json={"texts": texts[i:i + 4], "truncate": True},
                                  timeout=60).json() for i in range(0, len(texts), 4)]
            metrics = httpx.get(f"{server.url}/metrics").text
        full = clf.predict(recorded)
    got = {t: r for i, a in enumerate(answers) for t, r in zip(texts[4 * i:4 * i + 4], a["results"], strict=True)}
    assert 4 <= len(recorded) <= 28 and metric(metrics, "stopwise_shadow_texts_total") == len(recorded)
    for j, text in enumerate(recorded):
        assert got[text]["label_id"] == int(full.predictions[j]) and got[text]["exit_layer"] == clf.n_layers
        np.testing.assert_allclose(got[text]["probabilities"], full.probs[j], atol=1e-5)
    assert metric(metrics, "stopwise_window_traces") == len(recorded)
