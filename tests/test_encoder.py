"""Encoder early exit on the real bundled MiniLM (and one SmolLM2-backbone check)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import stopwise as sw

pytestmark = pytest.mark.model

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from stopwise.encoder import EarlyExitClassifier  # noqa: E402
from stopwise.encoder.backbone import pool  # noqa: E402
from stopwise.encoder.data import bbc_news  # noqa: E402

MAX_LEN = 32
SHIPPED = Path(__file__).resolve().parents[1] / "src" / "stopwise" / "data" / "bbc_minilm.npz"


@pytest.fixture(scope="module")
def bbc():
    data = bbc_news()
    rows = np.random.default_rng(0).permutation(len(data))
    return data.take(rows[:80]), data.take(rows[80:140])


@pytest.fixture(scope="module")
def clf(bbc):
    torch.set_num_threads(2)
    train, _ = bbc
    model = EarlyExitClassifier.from_base("minilm", class_names=train.class_names, max_length=MAX_LEN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(train.texts, train.labels, progress=False, epochs=60)
    return model


@pytest.fixture(scope="module")
def test_trace(clf, bbc):
    _, test = bbc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return clf.record(test.texts, test.labels, progress=False)


def _bare_final_probs(clf, texts):
    enc = clf.tokenizer(texts, truncation=True, max_length=clf.max_length, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = clf.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        logits = clf.heads.logits(clf.n_layers - 1, pool(hidden, enc["attention_mask"], clf.pooling))
        return torch.softmax(logits, dim=-1).double()


def _lam_between_values(z_values: np.ndarray) -> float:
    """A λ halfway between two observed statistic values, so float noise cannot flip a decision."""
    u = np.unique(z_values[np.isfinite(z_values)])
    i = len(u) // 2
    return float((u[i - 1] + u[i]) / 2)


def test_stopping_off_is_bit_identical_to_the_bare_model(clf, bbc):
    texts = bbc[1].texts[:20]
    ref = _bare_final_probs(clf, texts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rule in (None, sw.Never()):
            pred = clf.predict(texts, rule=rule, batch_size=64, sort=False)
            assert torch.equal(torch.from_numpy(pred.probs), ref)
            assert (pred.exit_layer == clf.n_layers).all()
            assert np.array_equal(pred.predictions, ref.argmax(dim=1).numpy())


def test_stopping_off_at_batch_1_is_bit_identical_to_the_bare_model_on_each_text(clf, bbc):
    # Unpadded batches take shortcuts (the remembered "no mask needed", the filled mean weights);
    # the second call takes them from what the first one remembered.
    texts = bbc[1].texts[20:23]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            for text in texts:
                pred = clf.predict([text], batch_size=1)
                assert torch.equal(torch.from_numpy(pred.probs), _bare_final_probs(clf, [text]))
    # The filled weights are kept per shape, as ordinary tensors: a later call with autograd on
    # (training code reusing the classifier) can read them.
    shapes = {key[:2] for key in clf._unpadded_weights}
    assert {(1, len(ids)) for ids in clf.tokenize(texts).ids} <= shapes
    weights = next(iter(clf._unpadded_weights.values()))
    assert not weights.is_inference()
    hidden = torch.ones(weights.shape[0], weights.shape[2], 3, requires_grad=True)
    torch.bmm(weights, hidden).sum().backward()
    assert torch.allclose(hidden.grad, weights.transpose(1, 2).expand_as(hidden))


def test_mean_weights_of_an_unpadded_batch_are_the_divided_ones():
    from stopwise.encoder.backbone import mean_weights

    for width in range(1, 513):
        mask = torch.ones((2, width), dtype=torch.long)
        assert torch.equal(mean_weights(mask, torch.float32, unpadded=True), mean_weights(mask, torch.float32))
    half = torch.ones((1, 7), dtype=torch.long)  # other dtypes take the general path
    assert torch.equal(mean_weights(half, torch.float16, unpadded=True), mean_weights(half, torch.float16))


def test_batches_are_right_padded_and_know_when_they_are_unpadded(clf):
    from stopwise.encoder.model import Encoded

    pad = clf.tokenizer.pad_token_id
    enc = Encoded([[5, 6, 7], [8, 9, 10], [11, 12], (13, 14, 15, 16)])
    one = Encoded([(13, 14, 15, 16)])  # a single request: nothing to sort or pad
    got = list(clf._batches(enc, 2, False)) + list(clf._batches(enc, 1, True)) + list(clf._batches(one, 4, True))
    assert [unpadded for *_, unpadded in got] == [True, False, True, True, True, True, True]
    assert got[-1][0].tolist() == [0] and got[-1][1].tolist() == [[13, 14, 15, 16]] and got[-1][2].tolist() == [[1] * 4]
    got = got[:-1]
    for rows, ids, mask, unpadded in got:
        assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape
        assert unpadded == bool(mask.all())
        for row, r in zip(ids.tolist(), rows, strict=True):
            n = len(enc.ids[r])
            assert row == list(enc.ids[r]) + [pad] * (len(row) - n)
        assert mask.sum(dim=1).tolist() == [len(enc.ids[r]) for r in rows]
    sorted_rows = [int(rows[0]) for rows, *_ in got[2:]]
    assert sorted_rows == [3, 0, 1, 2]  # longest first, ties in order


def test_heads_state_key_sees_every_tensor_and_every_change():
    from stopwise.encoder.heads import ExitHeads

    for kind in ("linear", "mlp"):
        heads = ExitHeads(3, 8, 2, kind=kind)
        expected = [*heads.parameters(), *heads.buffers()]
        assert len(heads.tensors()) == len(expected) and {id(t) for t in heads.tensors()} == {id(t) for t in expected}
        key = heads.state_key()
        with torch.no_grad():
            heads.heads[2].mean.add_(1.0)
        assert heads.state_key() != key
        key = heads.state_key()
        heads.heads[0].scale = torch.ones(8)  # a replaced buffer, not an in-place edit
        assert heads.state_key() != key


def test_fused_exit_head_equals_standardise_then_linear_and_follows_new_weights():
    from stopwise.encoder.heads import ExitHeads

    gen = torch.Generator().manual_seed(0)
    heads = ExitHeads(2, 16, 3)
    with torch.no_grad():
        for buf in (heads.heads[1].mean, heads.heads[1].net.weight, heads.heads[1].net.bias):
            buf.copy_(torch.randn(buf.shape, generator=gen))
        heads.heads[1].scale.copy_(torch.rand(16, generator=gen) + 0.5)
    x = torch.randn(5, 16, generator=gen)

    def plain() -> torch.Tensor:
        h = heads.heads[1]
        return torch.nn.functional.linear((x - h.mean) / h.scale, h.net.weight, h.net.bias)

    with torch.inference_mode():
        assert torch.allclose(heads.logits(1, x), plain(), atol=1e-5)
    with torch.no_grad():  # in-place changes (training, load_state_dict) invalidate the cached fusion
        heads.heads[1].net.weight.mul_(-2.0)
        heads.heads[1].scale.add_(1.0)
    with torch.inference_mode():
        assert torch.allclose(heads.logits(1, x), plain(), atol=1e-5)
        folded = heads.folded()  # what predict multiplies by, kept under one key for all heads
        assert folded is not None and torch.allclose(torch.nn.functional.linear(x, *folded[1]), plain(), atol=1e-5)
        with torch.no_grad():
            heads.heads[1].net.bias.add_(3.0)
        folded = heads.folded()
        assert folded is not None and torch.allclose(torch.nn.functional.linear(x, *folded[1]), plain(), atol=1e-5)
    other = ExitHeads(2, 16, 3)
    heads.load_state_dict(other.state_dict())
    with torch.inference_mode():
        assert torch.allclose(heads.logits(1, x), plain(), atol=1e-5)
    # With gradients on, the fusion is differentiable and nothing is cached.
    heads.logits(1, x).sum().backward()
    assert heads.heads[1].net.weight.grad is not None and heads.heads[1].net.weight.grad.abs().sum() > 0


def test_mean_pooling_with_kept_weights_is_the_masked_mean():
    from stopwise.encoder.backbone import mean_weights

    hidden = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    expect = torch.stack([hidden[0].mean(0), hidden[1, :2].mean(0), hidden[2, 0]])
    assert torch.allclose(pool(hidden, mask, "mean"), expect, atol=1e-6)
    assert torch.equal(pool(hidden, mask, "mean", weights=mean_weights(mask, hidden.dtype)), pool(hidden, mask, "mean"))


def _tiny_decoder(family: str):
    import transformers as tf

    cfg = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[family](
        hidden_size=32, num_hidden_layers=3, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=30522)
    torch.manual_seed(0)
    model = tf.AutoModel.from_config(cfg).eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)  # at init it is all ones, which would hide a missing scale
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decoder_exit_heads_pool_before_the_final_norm_to_the_same_values(family):
    """Early layers' heads norm the pooled token (cls, last) or fold an RMSNorm into the mean's
    weights; the values are the norm-then-pool ones up to float32 rounding."""
    from stopwise.encoder.backbone import Backbone

    model = _tiny_decoder(family)
    bb = Backbone(model)
    assert bb._rms_eps == pytest.approx(model.config.rms_norm_eps)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    ids = torch.randint(1, 30522, (3, 7), generator=torch.Generator().manual_seed(0)) * mask
    with torch.inference_mode():
        state = bb.start(ids, mask)
        bb.layer(0, state)
        for how in ("mean", "last", "cls"):
            exact = bb.pooled(state, how)
            assert torch.equal(exact, pool(bb.output(state), mask, how))
            torch.testing.assert_close(bb.pooled(state, how, exact=False), exact, rtol=1e-6, atol=1e-6)


def test_a_norm_of_another_formula_is_never_folded():
    from stopwise.encoder.backbone import Backbone

    class OnePlusWeightNorm(torch.nn.Module):  # Gemma's form: x / rms * (1 + weight), same attributes
        def __init__(self, like: torch.nn.Module) -> None:
            super().__init__()
            self.weight, self.variance_epsilon = like.weight, like.variance_epsilon

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)

    model = _tiny_decoder("llama")
    model.norm = OnePlusWeightNorm(model.norm)
    bb = Backbone(model)
    assert bb._rms_eps is None
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])
    with torch.inference_mode():
        state = bb.start(torch.randint(1, 30522, (2, 5), generator=torch.Generator().manual_seed(1)) * mask, mask)
        bb.layer(0, state)
        assert torch.equal(bb.pooled(state, "mean", exact=False), bb.pooled(state, "mean"))


def test_a_decoder_with_mean_pooling_decides_online_as_recorded(clf):
    m = EarlyExitClassifier.from_base((_tiny_decoder("llama"), clf.tokenizer), class_names=["a", "b", "c"],
                                      max_length=24, pooling="mean")
    texts = ["a short one", "a somewhat longer sentence about markets and shares", "x", "shares rose",
             "the match ended in a draw after extra time", "a film review", "rain later", "the minister resigned"]
    m.fit(texts * 3, [0, 1, 2, 0, 1, 2, 0, 1] * 3, epochs=20, progress=False)
    # The final head pools the normed states op for op as the bare model's output is pooled.
    assert torch.equal(torch.from_numpy(m.predict(texts, sort=False).probs), _bare_final_probs(m, texts))
    trace = m.record(texts, progress=False)
    lam = _lam_between_values(sw.MaxProb().z(trace)[:, :2])
    halts = sw.MaxProb(lam=lam).halts(trace)
    assert halts.min() < m.n_layers - 1 and halts.min() < halts.max()  # some exit early (folded norm), not all
    pred = m.predict(texts, rule=sw.MaxProb(lam=lam), batch_size=2)
    assert np.array_equal(pred.exit_layer - 1, halts)
    np.testing.assert_allclose(pred.probs, trace.probs[np.arange(trace.n), halts], atol=1e-6)


def test_exited_rows_leave_the_batch(clf, bbc, test_trace):
    lam = _lam_between_values(sw.MaxProb().z(test_trace)[:, 0])
    calls: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = clf.predict(bbc[1].texts, rule=sw.MaxProb(lam=lam), batch_size=len(bbc[1].texts), trace_calls=calls)
    assert calls[0] == len(bbc[1].texts)
    assert calls[-1] < calls[0] and all(a >= b for a, b in zip(calls, calls[1:], strict=False))
    # Every layer call ran exactly the rows that had not exited yet.
    assert sum(calls) == int(pred.exit_layer.sum())
    assert np.array_equal(pred.cost, pred.exit_layer.astype(float))


@pytest.mark.parametrize("lengths", ["equal", "mixed"])
def test_survivors_of_several_batches_are_repacked_into_full_ones(clf, bbc, test_trace, lengths):
    texts, trace = bbc[1].texts, test_trace
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if lengths == "mixed":
            # Articles cut to 2-40 words: batches of different widths, with padding, whose
            # survivors re-pack into batches that draw on several and are trimmed to their widest row.
            texts = [" ".join(t.split()[: 2 + i % 39]) for i, t in enumerate(texts)]
            trace = clf.record(texts, progress=False)
    lam = _lam_between_values(sw.MaxProb().z(trace)[:, 0])
    rule = sw.MaxProb(lam=lam)
    runs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for in_flight in (8, 64):  # one batch at a time, or up to eight advancing together
            calls: list[int] = []
            runs[in_flight] = (clf.predict(texts, rule=rule, batch_size=8, in_flight=in_flight, trace_calls=calls), calls)
    (alone, calls_alone), (packed, calls_packed) = runs[8], runs[64]
    assert np.array_equal(alone.exit_layer, packed.exit_layer) and np.array_equal(alone.predictions, packed.predictions)
    np.testing.assert_allclose(alone.probs, packed.probs, atol=2e-5)
    # Both stop where the recorded trace (one forward pass, nothing removed) halts, with its probabilities.
    halts = rule.halts(trace)
    assert np.array_equal(packed.exit_layer - 1, halts) and 1 < packed.exit_layer.mean() < clf.n_layers
    np.testing.assert_allclose(packed.probs, trace.probs[np.arange(trace.n), halts], atol=2e-5)
    assert sum(calls_alone) == sum(calls_packed) == int(packed.exit_layer.sum())
    # Same rows through the layers, in fewer calls: the 60 texts form one group, and at every
    # layer its S running rows fill exactly ceil(S / 8) calls instead of straggling in part-empty batches.
    assert len(calls_packed) < len(calls_alone)
    at = 0
    for k in range(clf.n_layers):
        running = int((packed.exit_layer > k).sum())
        n_calls = -(-running // 8)
        assert sum(calls_packed[at : at + n_calls]) == running and max(calls_packed[at : at + n_calls], default=0) <= 8
        at += n_calls
    assert at == len(calls_packed)
    with pytest.raises(sw.StopwiseError, match="'in_flight'"):
        clf.predict(texts[:2], batch_size=8, in_flight=4)


@pytest.mark.parametrize("rule_name", ["max_prob", "entropy", "patience"])
def test_online_decisions_equal_offline_halts(clf, bbc, test_trace, rule_name):
    rule = sw.make_rule(rule_name)
    if rule_name == "patience":
        lam = 2.0
    else:
        z = rule.z(test_trace)
        lam = rule.lam_from_threshold(_lam_between_values(z[:, :3]))
    halts = rule.halts(test_trace, lam)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = clf.predict(bbc[1].texts, rule=rule.with_lam(lam), batch_size=16)
    assert np.array_equal(pred.exit_layer - 1, halts)
    assert np.array_equal(pred.predictions, test_trace.predictions_at(halts))
    # The online head (folded weights, fetched once per call) is the recorded head at that layer;
    # only the batch composition differs (16 rows here, 32 when recording), hence float32 tolerance.
    np.testing.assert_allclose(pred.probs, test_trace.probs[np.arange(test_trace.n), halts], atol=2e-5)
    assert 1 < pred.exit_layer.mean() < clf.n_layers or rule_name == "patience"


@pytest.mark.parametrize("rule_name", ["max_prob", "entropy", "margin"])
def test_a_lone_row_is_decided_without_a_stopper_and_alike(clf, bbc, test_trace, monkeypatch, rule_name):
    rule = sw.make_rule(rule_name)
    texts = bbc[1].texts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Four one-row batches in flight: the general path, through a Stopper, at batch 1 (the
        # same floats as a lone row). λ then moves to the least confident statistic among the
        # rows that exited at the first layer, so that row stops there on a tie.
        lam0 = rule.lam_from_threshold(_lam_between_values(rule.z(test_trace)[:, :3]))
        first = clf.predict(texts, rule=rule.with_lam(lam0), batch_size=1)
        tie = rule.stage_statistic(first.probs[first.exit_layer == 1])
        lam = float(tie[np.argmin(rule.direction * tie)])
        general = clf.predict(texts, rule=rule.with_lam(lam), batch_size=1)
        monkeypatch.setattr(sw.rules.base.Stopper, "step", lambda *a, **k: pytest.fail("a lone row used the Stopper"))
        exact: list[int] = []
        statistic = type(rule).stage_statistic
        monkeypatch.setattr(type(rule), "stage_statistic", lambda self, p: exact.append(len(p)) or statistic(self, p))
        calls: list[int] = []
        alone = [clf.predict([t], rule=rule.with_lam(lam), batch_size=1, trace_calls=calls) for t in texts]
    exit_layer = np.array([p.exit_layer[0] for p in alone])
    assert np.array_equal(exit_layer, general.exit_layer)
    if rule_name == "entropy":  # the top value's bounds settled most layers, the tie among the rest
        assert 0 < len(exact) < len(calls) / 2
    assert np.array_equal(np.concatenate([p.probs for p in alone]), general.probs)  # bit for bit
    assert np.array_equal(np.concatenate([p.predictions for p in alone]), general.predictions)
    assert calls == [1] * int(exit_layer.sum())  # layers stop where the row exits
    assert 1 < exit_layer.mean() < clf.n_layers
    assert (rule.stage_statistic(general.probs) == lam).any()  # a tie that fired


def test_a_lone_row_under_a_rule_with_state_uses_the_stopper(clf, bbc, monkeypatch):
    texts = bbc[1].texts[:6]
    rule = sw.make_rule("patience").with_lam(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        general = clf.predict(texts, rule=rule, batch_size=1)
        steps: list[int] = []
        real = sw.rules.base.Stopper.step
        monkeypatch.setattr(sw.rules.base.Stopper, "step", lambda self, *a, **k: steps.append(1) or real(self, *a, **k))
        alone = [clf.predict([t], rule=rule, batch_size=1) for t in texts]
    assert np.array_equal(np.array([p.exit_layer[0] for p in alone]), general.exit_layer)
    assert len(steps) == int(general.exit_layer.sum())


def test_record_trace_contents(clf, bbc, test_trace):
    t = test_trace
    assert t.n == len(bbc[1].texts) and t.n_stages == clf.n_layers
    assert t.probs.shape == (t.n, clf.n_layers, 5)
    assert np.array_equal(t.reference, t.predictions[:, -1])
    assert np.array_equal(t.labels, bbc[1].labels)
    assert t.meta["base_model"] == clf.base_id and t.meta["heads"] == clf.heads_id
    assert np.array_equal(t.cost, np.arange(1, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flops = clf.record(bbc[1].texts[:4], cost="flops", progress=False)
    assert flops.cost.shape == (4, 6) and (np.diff(flops.cost, axis=1) > 0).all()
    # The final head is a real classifier on BBC News.
    assert (t.reference == t.labels).mean() > 0.7


def test_certificate_drives_predict_and_refuses_other_heads(clf, bbc, test_trace):
    cert = clf.calibrate(test_trace, "max_prob", epsilon=0.15, delta=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = clf.predict(bbc[1].texts, certificate=cert)
        assert np.array_equal(pred.exit_layer - 1, cert.make_rule().halts(test_trace))
        other = EarlyExitClassifier.from_base("minilm", class_names=bbc[0].class_names, max_length=MAX_LEN)
        other.fit(features=torch.randn(30, 6, 384), labels=np.arange(30) % 5, epochs=5)
    with pytest.raises(sw.StopwiseError, match="heads"):
        other.predict(bbc[1].texts[:2], certificate=cert)
    with pytest.raises(sw.StopwiseError, match="either"):
        clf.predict(bbc[1].texts[:2], certificate=cert, rule=sw.MaxProb(lam=0.5))


def test_a_rule_that_cannot_stop_before_the_last_layer_reads_no_other_head(clf, bbc, monkeypatch):
    heads_read: list[int] = []
    real = clf._head_fn

    def counting(key):
        head = real(key)
        return lambda k, state: heads_read.append(k) or head(k, state)

    monkeypatch.setattr(clf, "_head_fn", counting)
    texts = bbc[1].texts[:6]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = clf.predict(texts, batch_size=3)
        assert heads_read == [5, 5]
        for rule in (sw.Patience(lam=5), sw.Never(), sw.MaxProb(lam=1.5)):
            heads_read.clear()
            pred = clf.predict(texts, rule=rule, batch_size=3)
            assert heads_read == [5, 5], repr(rule)
            assert np.array_equal(pred.probs, full.probs) and (pred.exit_layer == 6).all()
        heads_read.clear()
        clf.predict(texts, rule=sw.Patience(lam=4), batch_size=3)  # may stop at layer 5: heads read
        assert heads_read[:2] == [0, 0]


def test_heads_changed_in_place_no_longer_match_their_certificate(clf, bbc, test_trace):
    cert = clf.calibrate(test_trace, "max_prob", epsilon=0.15, delta=0.2)
    before = clf.heads_id  # kept between predict calls: the edit below must still be seen
    weight = clf.heads.heads[0].net.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[0, 0] += 1.0
        assert clf.heads_id != before
        with pytest.raises(sw.StopwiseError, match="heads"):
            clf.predict(bbc[1].texts[:2], certificate=cert)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert clf.heads_id == before
    clf.predict(bbc[1].texts[:2], certificate=cert)


def test_predict_keeps_nothing_stale_between_calls(clf, bbc, test_trace):
    # predict keeps a certificate's rule and its head function from one call to the next (a lone
    # row each time, as a server calls it): edits to the certificate or the heads must be seen.
    cert = clf.calibrate(test_trace, "max_prob", epsilon=0.15, delta=0.2)
    early = np.flatnonzero(cert.make_rule().halts(test_trace) < clf.n_layers - 1)
    text = [bbc[1].texts[early[0]]]  # a row that stops early, so the edits below change something
    first = clf.predict(text, certificate=cert)
    assert first.exit_layer[0] < clf.n_layers
    lam = cert.lam
    try:
        cert.lam = 1.5  # no probability reaches it: the full model
        assert clf.predict(text, certificate=cert).exit_layer[0] == clf.n_layers
        cert.lam, cert.certified = lam, False  # nothing certified: the full model
        assert clf.predict(text, certificate=cert).exit_layer[0] == clf.n_layers
    finally:
        cert.lam, cert.certified = lam, True
    assert np.array_equal(clf.predict(text, certificate=cert).probs, first.probs)
    rule = cert.make_rule()
    bias = clf.heads.heads[int(first.exit_layer[0]) - 1].net.bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias.add_(torch.linspace(0.0, 4.0, len(bias)))
        with pytest.raises(sw.StopwiseError, match="heads"):
            clf.predict(text, certificate=cert)
        edited = clf.predict(text, rule=rule)
        recorded = clf.record(text, progress=False)
        k = int(edited.exit_layer[0]) - 1
        np.testing.assert_allclose(edited.probs[0], recorded.probs[0, k], atol=1e-6)
        assert np.abs(edited.probs - first.probs).max() > 0.01
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert np.array_equal(clf.predict(text, certificate=cert).probs, first.probs)


def test_save_and_load_round_trip(clf, bbc, tmp_path, test_trace):
    clf.certificate = sw.calibrate(test_trace, sw.MaxProb(), epsilon=0.15, delta=0.2)
    out = clf.save_pretrained(tmp_path / "heads")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["certificate.json", "heads.safetensors", "stopwise_heads.json"]
    text = (out / "stopwise_heads.json").read_text()
    cfg = json.loads(text)
    assert list(cfg) == sorted(cfg)
    assert cfg["n_layers"] == 6 and cfg["hidden_size"] == 384 and cfg["class_names"] == list(clf.class_names)
    assert cfg["stopwise_version"] == sw.__version__
    loaded = EarlyExitClassifier.from_pretrained("minilm", out)
    assert loaded.heads_id == clf.heads_id and loaded.certificate is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.array_equal(clf.predict(bbc[1].texts[:8]).probs, loaded.predict(bbc[1].texts[:8]).probs)
        a = clf.predict(bbc[1].texts[:8], certificate=clf.certificate)
        b = loaded.predict(bbc[1].texts[:8], certificate=loaded.certificate)
    assert np.array_equal(a.probs, b.probs) and np.array_equal(a.exit_layer, b.exit_layer)
    cfg["from_the_future"] = 1
    (out / "stopwise_heads.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="from_the_future"):
        EarlyExitClassifier.from_pretrained(None, out)


def test_heads_for_another_base_are_refused(clf, tmp_path):
    from transformers import BertConfig, BertModel

    out = clf.save_pretrained(tmp_path / "heads")
    tiny = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64))
    with pytest.raises(sw.StopwiseError, match="n_layers = 6.*has n_layers = 2"):
        EarlyExitClassifier.from_pretrained((tiny, clf.tokenizer), out)


def test_training_is_seeded_and_distillation_needs_no_labels(clf, bbc):
    feats = torch.randn(40, 6, 384, generator=torch.Generator().manual_seed(1))
    y = np.arange(40) % 5
    a = EarlyExitClassifier(clf.model, clf.tokenizer, class_names=clf.class_names, base_name="minilm").fit(features=feats, labels=y, epochs=20)
    b = EarlyExitClassifier(clf.model, clf.tokenizer, class_names=clf.class_names, base_name="minilm").fit(features=feats, labels=y, epochs=20)
    assert a.heads_id == b.heads_id
    final = a.heads.heads[-1].net.weight.clone()
    a.fit(features=feats, objective="distill", epochs=20)  # no labels: the final head teaches
    assert torch.equal(a.heads.heads[-1].net.weight, final) and a.heads_id != b.heads_id
    c = EarlyExitClassifier(clf.model, clf.tokenizer, class_names=clf.class_names, base_name="minilm", head="mlp")
    c.fit(features=feats, labels=y, objective="both", optimizer="lbfgs", epochs=10)
    assert c.config()["head"] == "mlp"
    # MLP heads take the module path online; it must give what recording gives.
    texts = bbc[1].texts[:6]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recorded = c.record(texts, progress=False)
        online = c.predict(texts, rule=sw.Never(), batch_size=32, sort=False)
    np.testing.assert_allclose(online.probs, recorded.probs[:, -1], atol=2e-5)


def test_bad_inputs_get_clear_errors(clf):
    with pytest.raises(sw.StopwiseError, match="single string"):
        clf.predict("one text")
    with pytest.raises(sw.StopwiseError, match="empty"):
        clf.predict(["fine", "   "])
    with pytest.raises(sw.StopwiseError, match="Row 1 is int"):
        clf.predict(["fine", 3])
    with pytest.raises(sw.StopwiseError, match="Unknown rule"):
        clf.predict(["fine"], rule="no_such_rule")
    with pytest.raises(sw.StopwiseError, match="has no λ"):
        clf.predict(["fine"], rule=sw.MaxProb())
    with pytest.raises(sw.StopwiseError, match="not one of the head's classes"):
        clf.record(["fine"], labels=["weather"])
    with pytest.raises(sw.StopwiseError, match="class name or an id"):
        clf.record(["fine"], labels=[9])
    with pytest.raises(sw.StopwiseError, match="not trained"):
        EarlyExitClassifier(clf.model, clf.tokenizer, class_names=["a", "b"], base_name="x").predict(["fine"])
    with pytest.warns(UserWarning, match="1 of 2 texts are longer than 32 tokens") as record:
        clf.predict(["short", "long " * 400])
    assert len([w for w in record if "truncated" in str(w.message)]) == 1


def test_unsupported_architecture_names_itself_and_the_supported(clf):
    from transformers import GPT2Config, GPT2Model

    gpt2 = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100, n_positions=32))
    with pytest.raises(sw.StopwiseError, match="'gpt2' is not supported.*bert.*llama"):
        EarlyExitClassifier.from_base((gpt2, clf.tokenizer), class_names=["a", "b"])


@pytest.mark.parametrize("family", ["roberta", "distilbert", "qwen2"])
def test_other_families_run_layer_by_layer_bit_identically(clf, family):
    """Tiny random models of other families (built from configs: no download) go through the same
    generic path: stopping off equals the bare model; early exit runs."""
    import transformers as tf

    small = {"vocab_size": 30522, "num_attention_heads": 2}
    cfg = {
        "roberta": lambda: tf.RobertaConfig(hidden_size=32, num_hidden_layers=3, intermediate_size=64, pad_token_id=0, **small),
        "distilbert": lambda: tf.DistilBertConfig(dim=32, n_layers=3, n_heads=2, hidden_dim=64, vocab_size=30522),
        "qwen2": lambda: tf.Qwen2Config(hidden_size=32, num_hidden_layers=3, intermediate_size=64, num_key_value_heads=1, **small),
    }[family]()
    torch.manual_seed(0)
    model = tf.AutoModel.from_config(cfg).eval()
    m = EarlyExitClassifier.from_base((model, clf.tokenizer), class_names=["a", "b", "c"], max_length=24)
    texts = ["a short one", "a somewhat longer sentence about markets and shares", "x"]
    m.fit(texts * 4, [0, 1, 2] * 4, epochs=20, progress=False)
    ref = _bare_final_probs(m, texts)
    assert torch.equal(torch.from_numpy(m.predict(texts, batch_size=8, sort=False).probs), ref)
    pred = m.predict(texts, rule=sw.MaxProb(lam=0.0))  # everyone exits at layer 1
    assert (pred.exit_layer == 1).all()
    # Re-packing survivors of several batches (rotary tables and positions too, for decoders)
    # decides as batches kept apart do.
    more = [*texts, "shares rose", "the match ended in a draw after extra time", "a film review", "rain later",
            "the minister resigned"]
    z0 = sw.MaxProb().z(m.record(more, progress=False))[:, 0]
    u = np.unique(z0)

    def spread(lam: float) -> bool:  # layer-1 survivors (z < λ) sit in more batches of 2 than they need
        rows = np.flatnonzero(z0 < lam)
        return len(set(rows // 2)) > -(-len(rows) // 2)

    lam = next(float(a + b) / 2 for a, b in zip(u[:-1], u[1:], strict=True) if spread(float(a + b) / 2))
    calls: tuple[list[int], list[int]] = ([], [])
    runs = [m.predict(more, rule=sw.MaxProb(lam=lam), batch_size=2, in_flight=f, sort=False, trace_calls=c)
            for f, c in zip((2, 8), calls, strict=True)]
    assert 1 < runs[1].exit_layer.max() and runs[1].exit_layer.min() == 1
    assert len(calls[1]) < len(calls[0])  # the survivors were re-packed (8 texts, one group)
    assert np.array_equal(runs[0].exit_layer, runs[1].exit_layer)
    np.testing.assert_allclose(runs[0].probs, runs[1].probs, atol=1e-5)


def test_smollm2_as_a_30_layer_classifier_backbone():
    m = EarlyExitClassifier.from_base("smollm2", class_names=["no", "yes"], max_length=16)
    assert m.n_layers == 30 and m.pooling == "last" and m.backbone.decoder
    texts = ["Is the sky blue?", "Stocks fell sharply on Monday as investors worried."]
    m.fit(texts, ["yes", "no"], epochs=5, progress=False)
    ref = _bare_final_probs(m, texts)  # AutoModel output includes LLaMA's final norm
    assert torch.equal(torch.from_numpy(m.predict(texts, sort=False).probs), ref)
    calls: list[int] = []
    pred = m.predict(texts, rule=sw.Patience(lam=1), trace_calls=calls)
    assert sum(calls) == int(pred.exit_layer.sum())


def test_shipped_trace_is_real_and_small():
    assert SHIPPED.is_file() and SHIPPED.stat().st_size < 2_000_000
    t = sw.Trace.load(SHIPPED)
    assert t.n_stages == 6 and t.probs is not None and t.labels is not None and t.n > 1000
    assert t.meta["n_cal"] + t.meta["n_test"] == t.n
    assert t.meta["base_model"].startswith("bert-6x384")
    assert (t.reference == t.labels).mean() > 0.9


def test_encoder_modules_import_without_torch():
    code = "import sys, stopwise.encoder, stopwise.encoder.cli, stopwise.encoder.data; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_train_record_calibrate_predict(tmp_path, bbc, capsys):
    from stopwise.cli import main

    train, test = bbc
    names = train.class_names
    jl = tmp_path / "train.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t, "label": names[y]}) for t, y in zip(train.texts[:40], train.labels[:40], strict=True)))
    cal = tmp_path / "cal.jsonl"
    cal.write_text("\n".join(json.dumps({"text": t, "label": names[y]}) for t, y in zip(test.texts, test.labels, strict=True)))
    plain = tmp_path / "texts.txt"
    plain.write_text("\n".join(t.replace("\n", " ") for t in test.texts[:5]) + "\n\n")
    heads = tmp_path / "heads"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["encoder", "train", str(jl), "--out", str(heads), "--max-length", "24", "--epochs", "30"]) == 0
        assert main(["encoder", "record", str(heads), "--texts", str(cal), "-o", str(tmp_path / "t.npz")]) == 0
        assert main(["encoder", "calibrate", str(heads), str(tmp_path / "t.npz"), "--epsilon", "0.15", "--delta", "0.2"]) == 0
        capsys.readouterr()
        assert main(["encoder", "predict", str(heads), "--texts", str(plain), "-o", str(tmp_path / "p.json")]) == 0
    out = json.loads((tmp_path / "p.json").read_text())
    assert out["stopping"] == "certificate" and len(out["predictions"]) == 5
    assert set(out["predictions"]) <= set(names)
    assert main(["encoder", "predict", str(heads), "--texts", str(tmp_path / "missing.txt")]) == 2
