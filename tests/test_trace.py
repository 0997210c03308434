from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from stopwise import NO_ANSWER, StopwiseError, Trace, TraceFormatError, hash_answers
from stopwise.synthetic import synthetic_trace


def small() -> Trace:
    return Trace(
        predictions=np.array([[0, 1, 1], [2, 2, 0]]),
        mask=np.array([[True, True, True], [True, True, False]]),
        probs=np.array([[[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]],
                        [[0.1, 0.1, 0.8], [0.2, 0.1, 0.7], [1.0, 0.0, 0.0]]]),
        labels=np.array([1, 2]),
        signals={"saturation": np.array([[0.1, 0.5, 0.9], [0.2, 0.95, 0.0]])},
        stage_names=("l1", "l2", "l3"),
        meta={"model": "toy"},
    )


def test_defaults_reference_is_last_existing_stage_and_cost_is_stage_count() -> None:
    t = small()
    assert t.reference.tolist() == [1, 2]
    assert t.lengths.tolist() == [3, 2]
    assert t.full_cost.tolist() == [3.0, 2.0]
    assert t.cost_matrix.shape == (2, 3)


def test_save_load_round_trip(tmp_path) -> None:
    t = small()
    path = t.save(tmp_path / "t.npz")
    back = Trace.load(path)
    assert back.fingerprint() == t.fingerprint()
    assert back.stage_names == t.stage_names
    assert back.meta["model"] == "toy"
    np.testing.assert_array_equal(back.signals["saturation"], t.signals["saturation"])


def test_split_concat_and_slicing_are_consistent() -> None:
    t = synthetic_trace(101, seed=3)
    a, b = t.split(0.3, seed=7)
    assert (a.n, b.n) == (30, 71)
    a2, _ = t.split(0.3, seed=7)
    assert a2.fingerprint() == a.fingerprint()
    whole = Trace.concat([a, b])
    assert whole.n == t.n
    assert sorted(map(tuple, whole.predictions.tolist())) == sorted(map(tuple, t.predictions.tolist()))
    assert t[5].n == 1 and t[:10].n == 10


def test_per_input_cost_survives_concat() -> None:
    t1 = Trace(predictions=np.zeros((2, 2), int), cost=np.array([[1.0, 2.0], [1.0, 3.0]]))
    t2 = Trace(predictions=np.zeros((1, 2), int))
    out = Trace.concat([t1, t2])
    assert out.cost_matrix.tolist() == [[1.0, 2.0], [1.0, 3.0], [1.0, 2.0]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"predictions": np.zeros(3, int)}, "must be 2-D"),
        ({"predictions": np.zeros((2, 2))}, "integer class ids"),
        ({"predictions": np.zeros((2, 2), int), "reference": np.zeros(3, int)}, "'reference' array"),
        ({"predictions": np.zeros((2, 2), int), "mask": np.array([[False, True], [True, True]])}, "non-empty prefix"),
        ({"predictions": np.zeros((2, 2), int), "cost": np.array([2.0, 1.0])}, "cumulative"),
        ({"predictions": np.zeros((2, 2), int), "cost": np.ones(3)}, "'cost' array"),
        ({"predictions": np.zeros((1, 2), int), "probs": np.array([[[np.nan, 0.5], [0.5, 0.5]]])}, "NaN or inf at input 0, stage 0"),
        ({"predictions": np.zeros((1, 2), int), "probs": np.array([[[0.9, 0.5], [0.5, 0.5]]])}, "probability vectors"),
        ({"predictions": np.zeros((1, 2), int), "signals": {"s": np.array([[np.inf, 0.0]])}}, "NaN or inf"),
    ],
)
def test_bad_arrays_get_clear_errors(kwargs, message) -> None:
    with pytest.raises(StopwiseError, match=message):
        Trace(**kwargs)


def test_load_rejects_truncated_foreign_and_other_version_files(tmp_path) -> None:
    t = small()
    good = t.save(tmp_path / "good.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(good[: len(good) // 2])
    with pytest.raises(TraceFormatError, match="truncated"):
        Trace.load(tmp_path / "trunc.npz")
    np.savez(tmp_path / "foreign.npz", x=np.zeros(3))
    with pytest.raises(TraceFormatError, match="not a stopwise trace"):
        Trace.load(tmp_path / "foreign.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(TraceFormatError):
        Trace.load(tmp_path / "text.npz")
    with pytest.raises(TraceFormatError, match="does not exist"):
        Trace.load(tmp_path / "missing.npz")
    # Same arrays, header claiming schema version 99.
    with zipfile.ZipFile(tmp_path / "good.npz") as zin, zipfile.ZipFile(tmp_path / "v99.npz", "w") as zout:
        for item in zin.namelist():
            data = zin.read(item)
            if item == "__header__.npy":
                arr = np.load(tmp_path / "good.npz")["__header__"]
                header = json.loads(arr.tobytes().decode())
                header["schema_version"] = 99
                import io

                buf = io.BytesIO()
                np.save(buf, np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
                data = buf.getvalue()
            zout.writestr(item, data)
    with pytest.raises(TraceFormatError, match="schema version 99"):
        Trace.load(tmp_path / "v99.npz")


def test_split_rejects_bad_sizes() -> None:
    t = synthetic_trace(10)
    for bad in (0, 10, 1.5, 0.0, True):
        with pytest.raises(StopwiseError, match="'first' parameter"):
            t.split(bad, seed=0)


def test_hash_answers_is_stable_and_maps_none_to_no_answer() -> None:
    ids = hash_answers(["42", "42", "7", None])
    assert ids[0] == ids[1] != ids[2]
    assert ids[3] == NO_ANSWER
    assert (ids[:3] >= 0).all()
    assert hash_answers(["42"])[0] == ids[0]


def test_tagged_json_files_are_read_or_refused_naming_the_path(tmp_path: Path) -> None:
    from stopwise.core.jsonfile import read_tagged_json

    good = tmp_path / "good.json"
    good.write_text('{"format": "stopwise.x", "a": 1}')
    assert read_tagged_json(good, fmt="stopwise.x", what="an x") == {"format": "stopwise.x", "a": 1}
    cases = {"broken.json": b"{", "other.json": b'{"format": "y"}', "list.json": b"[1]", "binary.json": b"\xff\xfe{"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(StopwiseError, match=f"'{tmp_path / name}' is not"):
            read_tagged_json(tmp_path / name, fmt="stopwise.x", what="an x")
    with pytest.raises(StopwiseError, match="is not an x \\(format 'y', expected 'stopwise.x'\\)"):
        read_tagged_json(tmp_path / "other.json", fmt="stopwise.x", what="an x")
