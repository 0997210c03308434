"""Speculative sampling's accept/resample step (Leviathan et al. 2023; Chen et al. 2023).

Accept a drafted token x ~ q with probability min(1, p(x)/q(x)); on rejection draw from
normalise(max(0, p - q)). Whatever q is, the emitted token is distributed exactly as p.
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
