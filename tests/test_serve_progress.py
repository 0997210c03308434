"""Issue #41: requests answered as their rows exit, and rows of clients that left dropped mid-batch.

On the encoder (predict's on_exit / cancelled) and through the server (DynamicBatcher with a
BatchProgress), on the small BBC/MiniLM classifier of tests/conftest.py. Order is shown by holding
the model thread at a layer until an answer arrives, and dropped work by counting rows per layer
call, never by wall-clock thresholds.
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from typing import Any

import numpy as np
import pytest

from stopwise.core.errors import StopwiseError
from stopwise.serve.progress import BatchProgress

MAX_LEN = 32


# -- the batcher's bookkeeping, without a model ----------------------------------------------
def test_batch_progress_settles_each_request_when_its_own_rows_are_answered() -> None:
    async def go() -> tuple[list[bool], Any, Any, np.ndarray]:
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in range(3)]
        progress = BatchProgress([(futs[0], 2), (futs[1], 1), (futs[2], 2)], "policy", loop)
        worker = threading.Thread(target=progress.answered, args=(np.array([4, 0]), ["e", "a"]))
        worker.start()  # from another thread, as the model thread reports
        worker.join()
        await asyncio.sleep(0)
        after_first = [f.done() for f in futs]  # request 0 still misses row 1, request 2 row 3
        progress.answered([3, 1], ["d", "b"])
        await asyncio.sleep(0)
        progress.withdraw(1)
        with pytest.raises(StopwiseError, match="Row 0 is not a row of this batch"):
            progress.answered([0], ["again"])
        return after_first, futs[0].result(), futs[2].result(), progress.cancelled

    after_first, first, third, cancelled = asyncio.run(go())
    assert after_first == [False, False, False]
    assert first == ("policy", ["a", "b"]) and third == ("policy", ["d", "e"])
    assert cancelled.tolist() == [2]  # the rows of the withdrawn request, for the model to drop


# -- the encoder -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(small_bbc_classifier: Any) -> Any:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return small_bbc_classifier(seed=1, sizes=(80, 60, 24), threads=2, max_length=MAX_LEN)


@pytest.fixture(scope="module")
def clf(built: Any) -> Any:
    return built[0]


@pytest.fixture(scope="module")
def texts(built: Any) -> list[str]:
    return list(built[1][2].texts)


def _collect(pred_kwargs: dict[str, Any], clf: Any, texts: list[str]) -> tuple[Any, list[Any]]:
    seen: list[Any] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = clf.predict(texts, on_exit=seen.append, **pred_kwargs)
    return pred, seen


@pytest.mark.model
@pytest.mark.parametrize("kwargs", [{"batch_size": 4, "in_flight": 8, "cost": "flops"}, {"batch_size": 1},
                                    {"batch_size": 32}], ids=["repacked_flops", "lone_rows", "one_batch"])
def test_on_exit_reports_each_row_once_with_the_values_predict_returns(clf: Any, texts: list[str],
                                                                       kwargs: dict[str, Any]) -> None:
    kwargs = {**kwargs, "certificate": clf.certificate}
    texts = texts[:8] if kwargs["batch_size"] == 1 else texts[:16]
    pred, seen = _collect(kwargs, clf, texts)
    rows = np.concatenate([s.rows for s in seen])
    assert sorted(rows.tolist()) == list(range(len(texts)))  # every row once
    for s in seen:
        assert np.array_equal(s.predictions, pred.predictions[s.rows]) and np.array_equal(s.probs, pred.probs[s.rows])
        assert np.array_equal(s.exit_layer, pred.exit_layer[s.rows]) and np.array_equal(s.cost, pred.cost[s.rows])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = clf.predict(texts, **kwargs)
    for name in ("predictions", "probs", "exit_layer", "cost"):  # the callback changes nothing
        assert np.array_equal(getattr(pred, name), getattr(plain, name)), name
    assert len(np.unique(pred.exit_layer)) > 1 and pred.exit_layer.min() < clf.n_layers  # rows left at several layers
    if kwargs["batch_size"] == 1:  # and predict's path for a single text
        one, seen_one = _collect({"certificate": clf.certificate}, clf, texts[:1])
        assert len(seen_one) == 1 and seen_one[0].rows.tolist() == [0]
        assert np.array_equal(seen_one[0].probs, one.probs) and seen_one[0].exit_layer.tolist() == one.exit_layer.tolist()


@pytest.mark.model
@pytest.mark.parametrize("stopping", [False, True])
def test_cancelled_rows_are_not_computed_further_and_the_others_are_unchanged(clf: Any, texts: list[str],
                                                                              stopping: bool) -> None:
    batch = texts[:8]
    kwargs: dict[str, Any] = {"batch_size": 8, "sort": False}
    if stopping:
        kwargs["certificate"] = clf.certificate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = clf.predict(batch, **kwargs)
    # Stopping off: rows 2 and 5. Stopping on: the row that runs longest, and one that exits first
    # (answered before it is cancelled, so it keeps its answer).
    order = np.argsort(ref.exit_layer, kind="stable")
    drop = [2, 5] if not stopping else [int(order[-1]), int(order[0])]
    asked: list[int] = []

    def cancelled() -> set[int]:
        asked.append(1)
        return set(drop) if len(asked) > 2 else set()  # from the third layer on

    calls: list[int] = []
    seen: list[Any] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = clf.predict(batch, on_exit=seen.append, cancelled=cancelled, trace_calls=calls, **kwargs)
    gone = np.zeros(8, bool)
    gone[drop] = ref.exit_layer[drop] > 2  # a row that exited in layers 1-2 was answered first
    assert gone.any() and pred.cancelled.tolist() == gone.tolist()
    assert pred.predictions[gone].tolist() == [-1] * gone.sum() and np.isnan(pred.probs[gone]).all()
    assert (pred.exit_layer[gone] == 0).all() and (pred.cost[gone] == 2).all()  # two layers ran before the drop
    answered = np.concatenate([s.rows for s in seen])
    assert sorted(answered.tolist()) == np.flatnonzero(~gone).tolist()  # no answer for a dropped row
    assert np.array_equal(pred.predictions[~gone], ref.predictions[~gone])
    assert np.array_equal(pred.exit_layer[~gone], ref.exit_layer[~gone])
    assert np.allclose(pred.probs[~gone], ref.probs[~gone], rtol=0, atol=1e-6)
    # Rows per layer call: what the reference ran, less the dropped rows from the third layer on.
    running = [int(((ref.exit_layer > k) & ~(gone & (k >= 2))).sum()) for k in range(clf.n_layers)]
    assert calls == [r for r in running if r > 0]
    if not stopping:
        assert calls == [8, 8, 6, 6, 6, 6] and gone.sum() == 2
        with pytest.raises(StopwiseError, match=r"Rows \[2, 5\] were cancelled"):
            _ = pred.labels
    lone: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = clf.predict(batch[:1], cancelled=lambda: [0], trace_calls=lone)  # dropped before its first layer
    assert alone.cancelled.tolist() == [True] and lone == [] and alone.cost.tolist() == [0.0]


def _bare_final_probs(clf: Any, texts: list[str]) -> Any:
    import torch

    from stopwise.encoder.backbone import pool

    enc = clf.tokenizer(texts, truncation=True, max_length=clf.max_length, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = clf.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        logits = clf.heads.logits(clf.n_layers - 1, pool(hidden, enc["attention_mask"], clf.pooling))
        return torch.softmax(logits, dim=-1).double()


@pytest.mark.model
def test_stopping_off_with_the_callbacks_is_bit_identical_to_the_bare_model(clf: Any, texts: list[str]) -> None:
    import torch

    pred, seen = _collect({"batch_size": 64, "sort": False, "cancelled": lambda: ()}, clf, texts)
    assert torch.equal(torch.from_numpy(pred.probs), _bare_final_probs(clf, texts))
    assert not pred.cancelled.any() and (pred.exit_layer == clf.n_layers).all() and len(seen) == 1
    for text in texts[:4]:
        one, _ = _collect({"batch_size": 1, "cancelled": lambda: ()}, clf, [text])
        assert torch.equal(torch.from_numpy(one.probs), _bare_final_probs(clf, [text]))


# -- through the server ----------------------------------------------------------------------
def _server_deps() -> tuple[Any, Any, Any]:
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from stopwise.serve.app import create_app
    from stopwise.serve.runner import ServerThread

    return httpx, create_app, ServerThread


@pytest.mark.model
def test_a_request_that_exits_early_is_answered_while_its_batch_still_runs(clf: Any, texts: list[str],
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    httpx, create_app, ServerThread = _server_deps()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exits = clf.predict(texts, certificate=clf.certificate).exit_layer
    early, late = texts[int(np.argmin(exits))], texts[int(np.argmax(exits))]
    assert exits.min() < exits.max()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = clf.predict([early, late], certificate=clf.certificate, batch_size=2)
    hold_at = int(ref.exit_layer[0])  # the first layer the early row does not run
    assert hold_at < ref.exit_layer[1]
    early_answered = threading.Event()
    held: list[bool] = []
    layer = clf.backbone.layer

    def holding_layer(k: int, state: Any) -> None:
        if k == hold_at:  # the late row waits here until the early one's client has its answer
            held.append(early_answered.wait(30))
        layer(k, state)

    monkeypatch.setattr(clf.backbone, "layer", holding_layer)
    app = create_app(clf, clf.certificate, max_batch_size=2, max_wait_ms=5000)
    got: dict[str, tuple[float, Any]] = {}

    async def go(url: str) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            async def post(name: str, text: str) -> None:
                r = await client.post(url, json={"texts": [text], "truncate": True})
                got[name] = (time.monotonic(), r)
                if name == "early":
                    early_answered.set()

            await asyncio.gather(post("early", early), post("late", late))

    with warnings.catch_warnings(), ServerThread(app) as server:
        warnings.simplefilter("ignore")
        asyncio.run(go(f"{server.url}/v1/classify"))
    assert held == [True]  # the batch was held until the early answer had reached its client
    assert got["early"][0] < got["late"][0] and app.state.metrics.batches == 1
    for i, name in enumerate(("early", "late")):
        row = got[name][1].json()["results"][0]
        assert row["label_id"] == ref.predictions[i] and row["exit_layer"] == ref.exit_layer[i]
        assert row["probabilities"] == ref.probs[i].tolist() and row["cost"] == ref.cost[i]


@pytest.mark.model
def test_a_client_that_leaves_mid_batch_has_its_rows_dropped_and_the_others_answered(
        clf: Any, texts: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    httpx, create_app, ServerThread = _server_deps()
    leaver_text, stayer_text = texts[0], texts[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = clf.predict([leaver_text, stayer_text], batch_size=2)
    app = create_app(clf, None, max_batch_size=2, max_wait_ms=5000)
    entered = threading.Event()
    rows_per_layer: list[int] = []
    layer = clf.backbone.layer

    def counting_layer(k: int, state: Any) -> None:
        rows_per_layer.append(int(state.hidden.shape[0]))
        if k == 1:  # hold the batch until the server has seen the client leave
            entered.set()
            deadline = time.monotonic() + 30
            while app.state.metrics.cancelled_running < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
        layer(k, state)

    monkeypatch.setattr(clf.backbone, "layer", counting_layer)

    async def go(url: str) -> Any:
        async with httpx.AsyncClient(timeout=60) as a, httpx.AsyncClient(timeout=60) as b:
            leaver = asyncio.ensure_future(a.post(url, json={"texts": [leaver_text], "truncate": True}))
            await asyncio.sleep(0.05)  # the leaver's request first in the batch
            stayer = asyncio.ensure_future(b.post(url, json={"texts": [stayer_text], "truncate": True}))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            leaver.cancel()
            return await stayer

    with warnings.catch_warnings(), ServerThread(app) as server:
        warnings.simplefilter("ignore")
        r = asyncio.run(go(f"{server.url}/v1/classify"))
        metrics = httpx.get(f"{server.url}/metrics").text
    # Two rows through layers 1-2, then the stayer alone: the leaver's last four layers never ran.
    assert rows_per_layer == [2, 2, 1, 1, 1, 1]
    assert app.state.metrics.cancelled_running == 1 and app.state.metrics.cancelled_rows == 1
    assert "stopwise_serve_cancelled_rows_total 1" in metrics
    row = r.json()["results"][0]
    assert r.status_code == 200 and row["label_id"] == ref.predictions[1] and row["exit_layer"] == clf.n_layers
    assert np.allclose(row["probabilities"], ref.probs[1], rtol=0, atol=1e-6)


@pytest.mark.model
def test_served_with_stopping_off_is_bit_identical_to_the_bare_model(clf: Any, texts: list[str]) -> None:
    import torch

    httpx, create_app, ServerThread = _server_deps()
    batch = texts[:12]
    app = create_app(clf, None, max_batch_size=len(batch), max_wait_ms=500)
    with warnings.catch_warnings(), ServerThread(app) as server:
        warnings.simplefilter("ignore")
        r = httpx.post(f"{server.url}/v1/classify", json={"texts": batch, "truncate": True}, timeout=60)
    served = torch.tensor([row["probabilities"] for row in r.json()["results"]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bare = _bare_final_probs(clf, batch)
    assert torch.equal(served, bare)  # JSON keeps float64 exactly


@pytest.mark.model
def test_with_recalibration_live_rows_are_answered_before_the_shadowed_rows_run(
        clf: Any, texts: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    httpx, create_app, ServerThread = _server_deps()
    from stopwise.serve.recalibrate import Recalibrator

    # A seed whose first draw shadows the second of two texts only: [live request, shadowed request].
    seed = next(s for s in range(100) if (np.random.default_rng(s).random(2) < 0.5).tolist() == [False, True])
    recal = Recalibrator(shadow_rate=0.5, window=1000, seed=seed)
    live_text, shadow_text = texts[2], texts[3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        live_ref = clf.predict([live_text], certificate=clf.certificate, batch_size=2)
        full_ref = clf.record([shadow_text], progress=False)
    live_answered = threading.Event()
    held: list[bool] = []
    record = clf.record

    def holding_record(*args: Any, **kwargs: Any) -> Any:  # the shadowed rows run after the live ones
        held.append(live_answered.wait(30))
        return record(*args, **kwargs)

    monkeypatch.setattr(clf, "record", holding_record)
    app = create_app(clf, clf.certificate, max_batch_size=2, max_wait_ms=5000, recalibrator=recal)
    got: dict[str, Any] = {}

    async def go(url: str) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            async def post(name: str, text: str, after: float) -> None:
                await asyncio.sleep(after)
                got[name] = await client.post(url, json={"texts": [text], "truncate": True})
                if name == "live":
                    live_answered.set()

            await asyncio.gather(post("live", live_text, 0.0), post("shadow", shadow_text, 0.1))

    with warnings.catch_warnings(), ServerThread(app) as server:
        warnings.simplefilter("ignore")
        asyncio.run(go(f"{server.url}/v1/classify"))
    assert held == [True] and recal.shadowed == 1 and app.state.metrics.batches == 1
    live_row, shadow_row = got["live"].json()["results"][0], got["shadow"].json()["results"][0]
    assert live_row["exit_layer"] == live_ref.exit_layer[0] and live_row["label_id"] == live_ref.predictions[0]
    assert live_row["probabilities"] == live_ref.probs[0].tolist()
    # The shadowed text is answered by the full model, from its trace.
    assert shadow_row["exit_layer"] == clf.n_layers and shadow_row["label_id"] == full_ref.predictions[0, -1]
