"""Decoder adapter on the bundled SmolLM2-135M-Instruct: exactness against transformers, heads I/O."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import stopwise  # noqa: E402

pytestmark = pytest.mark.model
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The Bank of England raised interest rates on Thursday,",
]


@pytest.fixture(scope="module")
def dec():
    from stopwise.decoder.api import Decoder
    from stopwise.decoder.heads import ExitHeads

    try:
        d = Decoder.from_pretrained("smollm2")
    except stopwise.StopwiseError as exc:
        pytest.skip(str(exc))
    # Untrained heads (rank 0: the model's own norm + head) with a reduced draft vocabulary:
    # exactness must hold whatever the drafts are.
    d.heads = ExitHeads(d.backbone, layers=[6, 10, 15], rank=0, draft_vocab=torch.arange(0, 8192))
    d.engine.heads = d.heads
    return d


def _hf_greedy(dec, prompt, n):
    ids = torch.tensor([dec.encode(prompt)])
    out = dec.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=dec.engine.pad)
    toks = out[0, ids.shape[1]:].tolist()
    eos = set(dec.eos_ids())
    for i, t in enumerate(toks):
        if t in eos:
            return toks[: i + 1]
    return toks


def test_full_and_speculative_equal_transformers_greedy(dec):
    for prompt in PROMPTS:
        ref = _hf_greedy(dec, prompt, 20)
        assert dec.generate(prompt, mode="full", max_new_tokens=20).token_ids[0] == ref
        # Exit-head drafts only, then with context drafts where the context repeats (the default).
        spec = dec.generate(prompt, mode="speculative", max_new_tokens=20, exit_layer=10, probe_every=3, lookup=0)
        assert spec.token_ids[0] == ref
        assert spec.stats["acceptance_rate"] is not None and spec.stats["lookup_steps"] == 0
        both = dec.generate(prompt, mode="speculative", max_new_tokens=20, exit_layer=10, probe_every=3)
        assert both.token_ids[0] == ref


def test_streaming_and_stats(dec):
    pieces = list(dec.stream(PROMPTS[0], mode="speculative", max_new_tokens=8, exit_layer=15))
    assert "".join(pieces).strip() and dec.last.stats["tokens_per_second"] > 0
    assert dec.last.stats["layers_per_token"] > 0


def test_heads_roundtrip_and_refusal(dec, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from stopwise.decoder.backbone import Backbone
    from stopwise.decoder.heads import ExitHeads

    heads = ExitHeads(dec.backbone, layers=[4, 8], rank=4)
    path = heads.save(tmp_path / "heads")
    loaded = ExitHeads.load(path, dec.backbone)
    assert loaded.layers == [4, 8] and loaded.identity == heads.identity
    other = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=64, num_hidden_layers=30,
                                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True))
    with pytest.raises(stopwise.StopwiseError, match="another base model"):
        ExitHeads.load(path, Backbone(other))


def test_bad_input(dec):
    with pytest.raises(stopwise.StopwiseError, match="non-empty"):
        dec.generate("  ", max_new_tokens=4)
    with pytest.raises(stopwise.StopwiseError, match="non-empty"):
        dec.generate([], max_new_tokens=4)
    with pytest.raises(stopwise.StopwiseError, match="max_new_tokens"):
        dec.generate("Hello", max_new_tokens=0)
    with pytest.raises(stopwise.StopwiseError, match="mode"):
        dec.generate("Hello", mode="fast")
    with pytest.raises(stopwise.StopwiseError, match="context"):
        dec.generate("word " * 8200, max_new_tokens=4)
    with pytest.raises(stopwise.StopwiseError, match="needs a rule"):
        dec.generate("Hello", mode="early_exit", max_new_tokens=4)
