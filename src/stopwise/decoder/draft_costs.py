"""What a draft costs: the parameter-count model of a draft step, LayerSkip's expected speedup,
and block costs measured on this machine (the time of one pass over 1, 2, ... positions)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from stopwise.core.errors import StopwiseError
from stopwise.decoder.backbone import append_tokens
from stopwise.decoder.loop import EngineBase


class DraftCosts(EngineBase):
    """Cost model and measured block costs that self-speculative decoding chooses drafts by."""

    def draft_cost(self, layer: int, reduced: bool) -> float:
        """A draft step at ``layer`` as a fraction of a full step (parameter count model)."""
        assert self.heads is not None
        v = self.heads.draft_vocab.numel() if reduced and self.heads.draft_vocab is not None else self.bb.vocab_size
        full = self.bb.n_layers * self.layer_params + self.head_params
        return float((layer * self.layer_params + v * self.bb.hidden_size) / full)

    def expected_speedup(self, alpha: float, gamma: float, cost: float) -> float:
        """LayerSkip/Leviathan: (1 - a^(g+1)) / ((1 - a)(g c + 1))."""
        alpha = min(max(alpha, 1e-6), 1 - 1e-6)
        return float((1 - alpha ** (gamma + 1)) / ((1 - alpha) * (gamma * cost + 1)))
    def measured_block_costs(self) -> dict[tuple[int, int], list[float]]:
        """The block-cost tables measured so far, keyed by (batch size, positions measured)."""
        return {key: list(costs) for key, costs in self._costs.items()}

    @torch.inference_mode()
    def block_costs(self, batch_size: int, upto: int) -> list[float]:
        """Time of one pass of all layers over blocks of 1..``upto`` positions per row, relative
        to 1 position, measured once per (batch size, upto) on a 32-position context: best of 3."""
        key = (batch_size, upto)
        if key not in self._costs:
            bb = self.bb
            state = bb.new_state(batch_size)
            ids = torch.arange(32 * batch_size, device=self.device).reshape(batch_size, 32) % bb.vocab_size
            pos = append_tokens(state, torch.ones_like(ids))
            bb.run(bb.embed(ids, pos), state, start=0, stop=bb.n_layers, positions=pos)
            best = [math.inf] * upto
            for _rep in range(3):
                for m in range(1, upto + 1):
                    block = ids[:, :m]
                    t = time.perf_counter()
                    pos = append_tokens(state, torch.ones_like(block))
                    bb.run(bb.embed(block, pos), state, start=0, stop=bb.n_layers, positions=pos)
                    best[m - 1] = min(best[m - 1], time.perf_counter() - t)
                    state.drop_last(m)
            self._costs[key] = [b / best[0] for b in best]
        return self._costs[key]
    def _heads_pay(self, alpha: float, gamma: float, layer: int, reduced: bool, m: int, costs: list[float]) -> bool:
        """Whether an exit-head step (gamma drafts accepted at rate alpha) makes more tokens per unit
        of time than a plain step, with the measured cost of verifying a block of m + gamma."""
        g = max(1, round(gamma))
        a = min(max(alpha, 1e-6), 1 - 1e-6)
        tokens = (1 - a ** (g + 1)) / (1 - a)
        seconds = g * self.draft_cost(layer, reduced) + costs[min(m + g, len(costs)) - 1]
        return tokens / seconds > 1.0 / costs[min(m, len(costs)) - 1]

    def _best_prior_layer(self, candidates: list[int], max_draft: int, reduced: bool) -> int:
        assert self.heads is not None
        agreement = self.heads.training_info.get("agreement", {})
        if not agreement:
            return candidates[len(candidates) // 2]
        return max(candidates, key=lambda x: self.expected_speedup(
            float(agreement.get(str(x), 0.0)), max_draft / 2, self.draft_cost(x, reduced)))


def check_costs(costs: Sequence[float]) -> list[float]:
    out = [float(c) for c in costs] if isinstance(costs, (list, tuple)) else []
    if not out or not all(math.isfinite(c) and c > 0 for c in out):
        raise StopwiseError(f"The 'block_costs' parameter of speculative decoding must be a non-empty list of positive "
                            f"floats (relative time of blocks of 1, 2, ... positions). Got {costs!r} instead.")
    return out
