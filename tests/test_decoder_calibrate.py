"""Early exit with one λ per row, and calibration recording that decodes each prompt once as a batch."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import stopwise  # noqa: E402
from stopwise.decoder.backbone import Backbone  # noqa: E402
from stopwise.decoder.calibrate import lcs_disagreement, record  # noqa: E402
from stopwise.decoder.engine import Engine  # noqa: E402
from stopwise.decoder.heads import ExitHeads  # noqa: E402

pytestmark = pytest.mark.model
PROMPTS = [[5, 17, 42, 9, 3], [7, 8]]
NEW = 10


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads that wait
    # for each other make these tests ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(kind: str) -> object:
    # float64 so that batch size cannot flip a near-tie; initializer_range 0.2 gives peaked, varied
    # predictions (the default 0.02 makes a random model repeat one token, so every λ agrees).
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                       initializer_range=0.2)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=6, n_head=4, n_positions=128,
                                      bos_token_id=1, eos_token_id=2, initializer_range=0.4)
        model = transformers.GPT2LMHeadModel(cfg)
    return model.to(torch.float64).eval()


def heads_for(bb: Backbone) -> ExitHeads:
    heads = ExitHeads(bb, rank=8, draft_vocab=torch.arange(200)).to(torch.float64)
    gen = torch.Generator().manual_seed(1)
    for a in heads.adapters.values():  # "trained": the adapters are no longer the identity
        a.up.weight.data = 0.3 * torch.randn(a.up.weight.shape, generator=gen, dtype=torch.float64)
    return heads


def grid_for(eng: Engine) -> list[float]:
    """λ values at quantiles of the heads' max probability, so that rows exit at varied layers."""
    heads = eng.heads
    assert heads is not None
    with torch.inference_mode():
        hs = eng.bb.model(torch.tensor([PROMPTS[0] + PROMPTS[1]]), output_hidden_states=True).hidden_states
        top = torch.cat([torch.softmax(heads.logits(hs[x][0], x, reduced=True), -1).max(-1).values for x in heads.layers])
    return [float(np.round(q, 4)) for q in np.quantile(top.numpy(), [0.1, 0.3, 0.5, 0.7, 0.9])]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_per_row_lams_equal_separate_decodes(kind):
    bb = Backbone(tiny(kind))
    eng = Engine(bb, heads_for(bb))
    grid = grid_for(eng)
    for p in PROMPTS:
        full = eng.full([p], max_new_tokens=NEW).extra_outputs[0]
        # EOS in the middle of the full generation: rows finish at different steps and stay fed.
        eos = {full[NEW // 2]}
        full = eng.full([p], max_new_tokens=NEW, eos=eos).extra_outputs[0]
        batch = eng.early_exit([p] * (len(grid) + 2), max_new_tokens=NEW, rule=stopwise.MaxProb(),
                               lams=[*grid, float("inf"), None], eos=eos)
        assert batch.extra_outputs[-1] == full and batch.extra_outputs[-2] == full
        assert batch.row_layers_per_token[-2:] == [6.0, 6.0]
        singles = [eng.early_exit([p], max_new_tokens=NEW, rule=stopwise.MaxProb(lam=lam), eos=eos) for lam in grid]
        for j, single in enumerate(singles):
            assert batch.extra_outputs[j] == single.extra_outputs[0], (j, grid[j])
            assert batch.row_layers_per_token[j] == pytest.approx(single.to_dict()["layers_per_token"])
            assert single.row_layers_per_token == pytest.approx([single.to_dict()["layers_per_token"]])
        expected = [x for s in singles for x in s.exit_layers] + [6] * 2 * (len(full) - 1)
        assert sorted(batch.exit_layers) == sorted(expected)
    # The grid makes rows differ: some exit early, and some disagree with the full model.
    assert min(batch.row_layers_per_token) < 6.0
    assert any(lcs_disagreement(o, full) > 0 for o in batch.extra_outputs[:-2])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_exited_rows_leave_the_batch_for_the_layers_they_skip(kind):
    bb = Backbone(tiny(kind))
    eng = Engine(bb, heads_for(bb))
    grid = grid_for(eng)
    n = len(grid) + 1
    rows_seen: dict[int, list[int]] = {i: [] for i in range(bb.n_layers)}

    def hook(i: int):
        def record(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if h.shape[1] == 1:  # decode steps, not the prefill
                rows_seen[i].append(h.shape[0])
        return record

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(bb.layers)]
    try:
        out = eng.early_exit([PROMPTS[0]] * n, max_new_tokens=NEW, rule=stopwise.MaxProb(), lams=[*grid, None])
    finally:
        for handle in handles:
            handle.remove()
    assert max(rows_seen[0]) == n
    # Once a row exits, the deeper layers run on fewer rows: real savings, not only accounting.
    assert min(rows_seen[bb.n_layers - 1]) < n
    assert sum(rows_seen[bb.n_layers - 1]) < sum(rows_seen[0])
    assert out.extra_outputs[-1] == eng.full([PROMPTS[0]], max_new_tokens=NEW).extra_outputs[0]


def test_per_row_lams_validation():
    bb = Backbone(tiny("llama"))
    eng = Engine(bb, heads_for(bb))
    with pytest.raises(stopwise.StopwiseError, match="The 'lams' parameter of early_exit must be a sequence of 2"):
        eng.early_exit(PROMPTS, max_new_tokens=2, rule=stopwise.MaxProb(), lams=[0.5])
    with pytest.raises(stopwise.StopwiseError, match="'lams' parameter of early_exit must"):
        eng.early_exit(PROMPTS, max_new_tokens=2, rule=stopwise.MaxProb(), lams=[0.5, float("nan")])
    with pytest.raises(stopwise.StopwiseError, match="needs 'rule'"):
        eng.early_exit(PROMPTS, max_new_tokens=2, schedule=[6, 6], lams=[0.5, 0.5])


class CharTokenizer:
    """Just enough of a tokenizer for Decoder: one id per character."""

    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [3 + ord(c) % 200 for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(32 + i % 90) for i in ids)


def test_record_batched_equals_sequential():
    from stopwise.decoder.api import Decoder

    dec = Decoder(tiny("llama"), CharTokenizer())
    dec.heads = heads_for(dec.backbone)
    dec.engine.heads = dec.heads
    grid = grid_for(dec.engine)
    prompts = ["hello world", [{"role": "user", "content": "hi"}]]
    dec.tokenizer.apply_chat_template = lambda msgs, add_generation_prompt: [1, *dec.encode(msgs[0]["content"])]
    batched = record(dec, prompts, grid=grid, max_new_tokens=NEW)
    sequential = record(dec, prompts, grid=grid, max_new_tokens=NEW, batched=False)
    assert batched["outputs"] == sequential["outputs"]
    np.testing.assert_array_equal(batched["loss"], sequential["loss"])
    np.testing.assert_allclose(batched["cost"], sequential["cost"])
    assert batched["loss"].shape == batched["cost"].shape == (2, len(grid) + 1)
    assert set(batched) == set(sequential) == {"loss", "cost", "outputs", "grid", "rule"}
    assert (batched["loss"][:, -1] == 0).all() and (batched["cost"][:, -1] == 6.0).all()
    assert batched["loss"].max() > 0 and batched["cost"].min() < 6.0
