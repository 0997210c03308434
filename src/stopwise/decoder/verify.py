"""Verifying drafted tokens against the full model.

Speculative sampling's accept/resample step (Leviathan et al. 2023; Chen et al. 2023): accept a
drafted token x ~ q with probability min(1, p(x)/q(x)); on rejection draw from
normalise(max(0, p - q)). Whatever q is, the emitted token is distributed exactly as p.
:func:`verify_fixed` applies it to deterministic drafts (copied from the context), where q is one-hot.
"""

from __future__ import annotations

import torch


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, x: torch.Tensor, *, generator: torch.Generator | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows of target ``p`` (B, V), draft ``q`` (B, V) and drafted tokens ``x`` (B,):
    returns (accepted (B,) bool, token (B,)): ``x`` where accepted, else a residual draw."""
    rows = torch.arange(p.shape[0], device=p.device)
    px, qx = p[rows, x], q[rows, x]
    u = torch.rand(p.shape[0], generator=generator, device=p.device, dtype=p.dtype)
    # u < p/q, written as u*q < p so that q(x) = 0 (impossible draft) never divides.
    accepted = u * qx < px
    residual = (p - q).clamp(min=0)
    mass = residual.sum(dim=1, keepdim=True)
    # p == q leaves no residual mass, but then rejection has probability 0 anyway: fall back to p.
    residual = torch.where(mass > 0, residual / mass.clamp(min=torch.finfo(p.dtype).tiny), p)
    redraw = torch.multinomial(residual, 1, generator=generator).squeeze(1)
    return accepted, torch.where(accepted, x, redraw)


def sample(p: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
    return torch.multinomial(p, 1, generator=generator).squeeze(1)


def tempered_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax of ``logits / temperature`` in float64."""
    return torch.softmax(logits.to(torch.float64) / temperature, dim=-1)


def verify_fixed(target_logits: torch.Tensor, drafts: torch.Tensor, lengths: list[int], temperature: float,
                  generator: torch.Generator | None) -> tuple[list[list[int]], list[int]]:
    """Per row: the accepted prefix of its first ``lengths[r]`` drafted tokens plus one token of
    the full model. The drafts are deterministic (q is one-hot), so with sampling a draft x is
    accepted with probability p(x) and a rejection redraws from p without x: exactly p."""
    n, k = drafts.shape
    if temperature <= 0:
        target = target_logits.argmax(dim=-1)  # (n, k+1)
        inside = torch.arange(k, device=drafts.device)[None, :] < torch.tensor(lengths, device=drafts.device)[:, None]
        n_acc = ((drafts == target[:, :k]) & inside).to(torch.long).cumprod(dim=1).sum(dim=1).tolist() if k else [0] * n
        return [drafts[r, : n_acc[r]].tolist() + [int(target[r, n_acc[r]])] for r in range(n)], n_acc
    new: list[list[int]] = [[] for _ in range(n)]
    n_acc, open_ = [0] * n, [True] * n
    for j in range(k + 1):
        p = tempered_probs(target_logits[:, j], temperature)
        if any(open_[r] and j < lengths[r] for r in range(n)):
            q = torch.zeros_like(p)
            q[torch.arange(n), drafts[:, j]] = 1.0
            ok, tok = accept_or_resample(p, q, drafts[:, j], generator=generator)
            for r in range(n):
                if open_[r] and j < lengths[r]:
                    new[r].append(int(tok[r]))
                    n_acc[r] += int(ok[r])
                    open_[r] = bool(ok[r])
        if any(open_[r] and j == lengths[r] for r in range(n)):
            bonus = sample(p, generator=generator)
            for r in range(n):
                if open_[r] and j == lengths[r]:
                    new[r].append(int(bonus[r]))
                    open_[r] = False
    return new, n_acc
