"""Ray paths of the encoder on the real bundled MiniLM, on a local Ray (2 CPUs) started here.

Ray Data's ``record_traces`` equals ``clf.record`` row for row; the Ray Serve deployment answers
what ``predict`` answers, batches concurrent requests together and refuses bad input with 4xx
while staying up.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.model

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("ray.data")
httpx = pytest.importorskip("httpx")

from stopwise._errors import StopwiseError  # noqa: E402
from stopwise.serve.app import certificate_id  # noqa: E402
from stopwise.serve.runner import free_port  # noqa: E402

MAX_LEN = 32


@pytest.fixture(scope="module")
def built(small_bbc_classifier: Any) -> Any:
    return small_bbc_classifier(seed=1, sizes=(120, 80, 96), threads=1, max_length=MAX_LEN)


@pytest.fixture(scope="module")
def bbc(built: Any) -> Any:
    return built[1]


@pytest.fixture(scope="module")
def clf(built: Any) -> Any:
    return built[0]


@pytest.fixture(scope="module")
def heads(clf: Any, tmp_path_factory: Any) -> Path:
    path: Path = clf.save_pretrained(tmp_path_factory.mktemp("ray") / "heads")
    return path


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


# -- Ray Data ------------------------------------------------------------------------------------

def _check_ray_record(clf: Any, test: Any, heads: Path, concurrency: int, *, labelled: bool = True) -> None:
    from stopwise.serve.ray_data import record_traces

    texts, labels = list(test.texts), list(test.labels) if labelled else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = clf.record(texts, labels, progress=False)
        got = record_traces(texts, labels, heads_dir=heads, batch_size=12, concurrency=concurrency, threads=1)
    assert got.n == ref.n == len(texts)
    assert np.array_equal(got.predictions, ref.predictions)
    assert np.allclose(got.probs, ref.probs, atol=1e-6, rtol=0)
    assert np.array_equal(got.cost, ref.cost)
    assert (got.labels is None and ref.labels is None) if not labelled else np.array_equal(got.labels, ref.labels)
    assert got.stage_names == ref.stage_names and dict(got.meta) == dict(ref.meta)
    # The same certificate decides the same exits on both traces.
    rule, lam = clf.certificate.make_rule(), clf.certificate.lam
    assert np.array_equal(rule.halts(got, lam), rule.halts(ref, lam))


def test_ray_data_record_equals_local_record_in_input_order(clf: Any, bbc: Any, heads: Path, local_ray: Any) -> None:
    _check_ray_record(clf, bbc[2], heads, concurrency=1)


@pytest.mark.slow
def test_ray_data_record_with_two_actors_equals_local_record(clf: Any, bbc: Any, heads: Path, local_ray: Any) -> None:
    # Two actor processes and small batches: blocks come back from both, in any order.
    _check_ray_record(clf, bbc[2], heads, concurrency=2, labelled=False)


def test_ray_data_refuses_bad_input_before_starting_work(heads: Path, tmp_path: Path) -> None:
    from stopwise.serve.ray_data import record_traces

    with pytest.raises(StopwiseError, match="'texts' parameter of record_traces must hold at least one text"):
        record_traces([], heads_dir=heads)
    with pytest.raises(StopwiseError, match="must hold strings only. Got int at index 1"):
        record_traces(["a", 3], heads_dir=heads)  # type: ignore[list-item]
    with pytest.raises(StopwiseError, match="one label per text"):
        record_traces(["a", "b"], ["sport"], heads_dir=heads)
    with pytest.raises(StopwiseError, match="'heads_dir' parameter of record_traces must be a directory"):
        record_traces(["a"], heads_dir=tmp_path / "missing")
    with pytest.raises(StopwiseError, match="'batch_size' parameter"):
        record_traces(["a"], heads_dir=heads, batch_size=0)


def test_assemble_restores_input_order_from_shuffled_batches(clf: Any, bbc: Any) -> None:
    from stopwise.serve.ray_data import assemble

    test = bbc[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = clf.record(list(test.texts), list(test.labels), progress=False)
    head = json.dumps({"meta": dict(ref.meta), "stage_names": list(ref.stage_names)})
    meta = np.array([head] * ref.n, dtype=object)
    cols = {"idx": np.arange(ref.n), "predictions": ref.predictions, "probs": ref.probs, "cost": ref.cost_matrix,
            "labels": ref.labels, "meta": meta}
    cuts = np.array_split(np.random.default_rng(0).permutation(ref.n), 7)  # blocks of scattered rows, any order
    parts = [{k: v[rows] for k, v in cols.items()} for rows in cuts]
    got = assemble(parts, ref.n)
    assert np.array_equal(got.predictions, ref.predictions) and np.array_equal(got.probs, ref.probs)
    assert np.array_equal(got.labels, ref.labels) and dict(got.meta) == dict(ref.meta)
    with pytest.raises(StopwiseError, match="not each text once"):
        assemble(parts + parts[:1], ref.n)  # a block delivered twice
    with pytest.raises(StopwiseError, match="not each text once"):
        assemble(parts[1:], ref.n)  # a block lost


def test_importing_stopwise_serve_does_not_import_ray() -> None:
    code = "import sys, stopwise.serve, stopwise.serve.cli; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- Ray Serve -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(heads: Path, local_ray: Any) -> Iterator[tuple[str, Any]]:
    from ray import serve

    from stopwise.serve.ray_serve import build_app, run

    port = free_port()
    # A long wait lets the concurrent requests below meet in one batch even on a loaded machine.
    app = build_app(heads, max_batch_size=16, batch_wait_timeout_s=0.5, max_texts=8, threads=1)
    handle = run(app, port=port)
    yield f"http://127.0.0.1:{port}", handle
    serve.shutdown()


def _post_concurrently(url: str, bodies: list[Any]) -> list[Any]:
    async def go() -> list[Any]:
        async with httpx.AsyncClient(timeout=120) as client:
            return list(await asyncio.gather(*(client.post(url, json=b) for b in bodies)))
    return asyncio.run(go())


def test_ray_serve_answers_equal_predict_and_batches_concurrent_requests(clf: Any, bbc: Any,
                                                                         served: tuple[str, Any]) -> None:
    url, handle = served
    texts = list(bbc[2].texts[:16])
    before = handle.stats.remote().result()
    answers = _post_concurrently(f"{url}/v1/classify", [{"texts": [t], "truncate": True} for t in texts])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = clf.predict(texts, certificate=clf.certificate)
    assert [a.status_code for a in answers] == [200] * len(texts)
    rows = [a.json()["results"][0] for a in answers]
    assert [r["label"] for r in rows] == [clf.class_names[i] for i in ref.predictions]
    assert [r["exit_layer"] for r in rows] == ref.exit_layer.tolist()
    assert [r["cost"] for r in rows] == ref.cost.tolist()
    assert np.allclose([r["probabilities"] for r in rows], ref.probs, atol=1e-5)
    assert ref.exit_layer.min() < clf.n_layers  # the certificate made some texts exit early
    body = answers[0].json()
    assert body["certificate_id"] == certificate_id(clf.certificate) and body["lambda"] == clf.certificate.lam
    assert body["classes"] == list(clf.class_names)
    sizes = handle.stats.remote().result()["batch_sizes"][len(before["batch_sizes"]):]
    # 16 one-text requests at once: Ray Serve put several into one predict call.
    assert sum(sizes) == len(texts) and max(sizes) > 1 and len(sizes) < len(texts)
    # The handle path answers the same as HTTP for a several-text call.
    direct = handle.classify.remote(texts[:5]).result()
    assert [r["exit_layer"] for r in direct["results"]] == ref.exit_layer[:5].tolist()


def test_ray_serve_refuses_bad_input_with_4xx_and_stays_up(clf: Any, bbc: Any, served: tuple[str, Any]) -> None:
    url, handle = served
    with pytest.raises(Exception, match="at least one string"):  # the handle refuses what HTTP refuses
        handle.classify.remote([]).result()
    cases = [({"texts": []}, 400, "at least one string"), ({"texts": "one"}, 400, "must be a list of strings"),
             ({"texts": ["a", 2]}, 400, "Got int at index 1"), ({"texts": ["a"] * 9}, 413, "at most 8 strings"),
             ({"texts": ["a"], "truncate": "yes"}, 400, "'truncate' field"), ([1, 2], 400, "JSON object"),
             ({"texts": ["short", bbc[2].texts[0]]}, 400, f"at most {MAX_LEN} tokens")]
    for body, status, message in cases:
        r = httpx.post(f"{url}/v1/classify", json=body, timeout=60)
        assert r.status_code == status, (body, r.text)
        assert message in r.json()["error"]["message"], (body, r.text)
    r = httpx.post(f"{url}/v1/classify", content=b"{not json", timeout=60)
    assert r.status_code == 400 and "valid JSON" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/classify", timeout=60).status_code == 405
    health = httpx.get(f"{url}/health", timeout=60).json()
    assert health["status"] == "ok" and health["certificate_id"] == certificate_id(clf.certificate)
    r = httpx.post(f"{url}/v1/classify", json={"texts": ["short one"]}, timeout=60)
    assert r.status_code == 200 and len(r.json()["results"]) == 1  # the replica is still up


def test_build_app_checks_its_arguments(heads: Path, tmp_path: Path) -> None:
    from stopwise.serve.ray_serve import build_app, run

    with pytest.raises(StopwiseError, match="'heads_dir' parameter of build_app must be a directory"):
        build_app(tmp_path / "missing")
    with pytest.raises(StopwiseError, match="'max_batch_size' parameter"):
        build_app(heads, max_batch_size=0)
    with pytest.raises(StopwiseError, match="'batch_wait_timeout_s' parameter of build_app must be a number >= 0"):
        build_app(heads, batch_wait_timeout_s=-1)
    with pytest.raises(StopwiseError, match="must be None when stopping=False"):
        build_app(heads, stopping=False, certificate=str(heads / "certificate.json"))
    with pytest.raises(StopwiseError, match="'host' parameter of run must be a loopback address"):
        run(object(), host="0.0.0.0")


@pytest.mark.slow
def test_ray_serve_with_stopping_off_is_the_bare_model(clf: Any, bbc: Any, heads: Path,
                                                      served: tuple[str, Any]) -> None:
    from stopwise.serve.ray_serve import build_app, run

    url, _ = served
    port = int(url.rsplit(":", 1)[1])
    texts = list(bbc[2].texts[:8])
    # Replaces the certified app of the `served` fixture (same name): keep this test last.
    handle = run(build_app(heads, stopping=False, max_batch_size=8, batch_wait_timeout_s=0.5, threads=1), port=port)
    answers = _post_concurrently(f"{url}/v1/classify", [{"texts": [t], "truncate": True} for t in texts])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = clf.predict(texts)
    rows = [a.json()["results"][0] for a in answers]
    assert answers[0].json()["certificate_id"] is None and answers[0].json()["lambda"] is None
    assert [r["exit_layer"] for r in rows] == [clf.n_layers] * len(texts) == ref.exit_layer.tolist()
    assert [r["label"] for r in rows] == [clf.class_names[i] for i in ref.predictions]
    assert np.allclose([r["probabilities"] for r in rows], ref.probs, atol=1e-5)
    assert max(handle.stats.remote().result()["batch_sizes"]) > 1


@pytest.mark.slow
def test_module_command_serves_until_ctrl_c(clf: Any, heads: Path) -> None:
    import os
    import signal
    import threading

    port = free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "stopwise.serve.ray_serve", "--heads", str(heads), "--port",
                             str(port), "--threads", "1", "--ray-cpus", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("stopwise ray serve: http://127.0.0.1:"):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(timeout=240), "".join(lines)[-3000:]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/classify", json={"texts": ["Shares rose on Monday."]}, timeout=60)
        assert r.status_code == 200 and r.json()["certificate_id"] == certificate_id(clf.certificate)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, "".join(lines)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
