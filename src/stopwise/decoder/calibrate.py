"""Sequence-level calibration of early-exit decoding (CALM's "textual consistency", with LTT).

A token-level exit threshold changes whole generations, so the unit of calibration is a prompt:

- stages are the candidate thresholds λ_0 < ... < λ_{K-2} (aggressive to conservative) followed
  by the full model; stage k of prompt i is "decode prompt i early-exiting with λ_k";
- the loss of stage k is the *token disagreement* of that generation with the full model's greedy
  generation, 1 - LCS(early, full) / max(len(early), len(full)) in [0, 1] (0 at the full stage);
  LCS rather than position-by-position so one inserted token does not count the whole rest as wrong;
- the rule is "stop at the first stage whose grid position k/(K-1) is >= λ" (``Signal`` on a
  ``grid_position`` signal), so the core's Learn-then-Test with fixed-sequence testing (from the
  full model down) certifies the most aggressive threshold with P(disagreement <= ε) >= 1 - δ
  for new prompts exchangeable with the calibration prompts.

Cost per stage is the layers run per token, made cumulative (running max over stages) as traces
require; it only orders equally certified thresholds.

Recording decodes each prompt once, as a batch of K rows: the prompt replicated, row k < K-1
early-exiting with λ_k (per-row thresholds, ``Engine.early_exit(..., lams=...)``) and the last row
never exiting, which is the full model's greedy generation. This is exact, up to floating-point
differences between batch sizes, with decoding the prompt separately at each λ and with the full
model (``record(..., batched=False)`` does that, K sequential batch-1 decodes):

- rows are independent: attention, the KV cache, positions and the rule's state are per row, the
  stopper compares each row with its own threshold, and a greedy token is an argmax per row;
- identical prompts need no padding (their prefill even runs once, its cache repeated per row),
  and every row is fed one token per step (finished rows too), so all rows always have the same
  length and the same (all-real) attention mask;
- a row that has finished (EOS or budget) keeps being fed its own uncommitted predictions, which
  only grow its own cache; ``Rows.done`` keeps them out of its output, its cost and the exit
  statistics, and it cannot change any other row's tokens or exits;
- a row that exits early leaves the batch for the layers it skips (they run on the rows still
  going, ``Engine._layer_for_rows``) and gets those layers' K/V from its exited state, the same
  ``_kv`` projections whether other rows still run the layers or all rows have exited.

Only greedy decoding is batched this way (random draws would depend on the batch's composition),
and that is what calibration uses. On a CPU a batch of K rows costs about one full-model decode
plus the exit heads instead of K decodes, less the layers that exited rows skip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from stopwise.core.errors import StopwiseError

DEFAULT_GRIDS = {
    "max_prob": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99],
    "saturation": [0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999],
}


def lcs_disagreement(a: Sequence[int], b: Sequence[int]) -> float:
    """1 - LCS(a, b) / max(len(a), len(b)); 0 for identical sequences."""
    if not a and not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b))


def record(decoder: Any, prompts: Sequence[Any], *, rule: str = "max_prob", grid: Sequence[float] | None = None,
           max_new_tokens: int = 64, exit_layers: list[int] | None = None, log: Callable[[str], None] | None = None,
           batched: bool = True) -> dict[str, Any]:
    """Decode every prompt with the full model and at every λ; losses, costs and outputs per (prompt, stage).

    ``batched`` (default): one decode per prompt, a batch of one row per λ plus a never-exiting
    row for the full model (see the module docstring); False: one batch-1 decode per (prompt,
    stage), full model first."""
    from stopwise.core.rules import make_rule

    grid = list(DEFAULT_GRIDS.get(rule, []) if grid is None else grid)
    if not grid or sorted(grid) != grid:
        raise StopwiseError(f"The 'grid' of calibrate_early_exit must be increasing λ values (aggressive first). Got {grid!r}.")
    base = make_rule(rule)
    n_layers = decoder.backbone.n_layers
    k = len(grid) + 1
    loss = np.zeros((len(prompts), k))
    cost = np.full((len(prompts), k), float(n_layers))
    outputs: list[list[list[int]]] = []
    for i, prompt in enumerate(prompts):
        if batched:
            # generate() encodes each copy exactly as it encodes a single prompt.
            out = decoder.generate([prompt] * k, mode="early_exit", max_new_tokens=max_new_tokens,
                                   rule=base, lams=[*grid, None], exit_layers=exit_layers)
            *row, full = out.token_ids
            for j in range(len(grid)):
                loss[i, j] = lcs_disagreement(row[j], full)
                cost[i, j] = out.stats["row_layers_per_token"][j]
        else:
            full = decoder.generate(prompt, mode="full", max_new_tokens=max_new_tokens).token_ids[0]
            row = []
            for j, lam in enumerate(grid):
                out = decoder.generate(prompt, mode="early_exit", max_new_tokens=max_new_tokens,
                                       rule=base.with_lam(lam), exit_layers=exit_layers)
                row.append(out.token_ids[0])
                loss[i, j] = lcs_disagreement(out.token_ids[0], full)
                cost[i, j] = out.stats["layers_per_token"]
        outputs.append([*row, full])
        if log is not None:
            log(f"prompt {i + 1}/{len(prompts)}: disagreement {np.round(loss[i, :-1], 2).tolist()}")
    return {"loss": loss, "cost": np.maximum.accumulate(cost, axis=1), "outputs": outputs, "grid": grid, "rule": rule}


def to_trace(recorded: dict[str, Any], *, meta: dict[str, Any] | None = None) -> Any:
    from stopwise.core.trace import Trace, hash_answers

    outputs = recorded["outputs"]
    n, k = recorded["loss"].shape
    preds = np.stack([hash_answers(",".join(map(str, o)) for o in row) for row in outputs])
    return Trace(
        predictions=preds, cost=recorded["cost"],
        signals={"grid_position": np.broadcast_to(np.arange(k) / (k - 1), (n, k)).copy(),
                 "disagreement": recorded["loss"]},
        stage_names=tuple([f"{recorded['rule']}>={lam:g}" for lam in recorded["grid"]] + ["full"]),
        meta={"task_format": "decoder.sequence_disagreement", **(meta or {})},
    )


def calibrate_early_exit(decoder: Any, prompts: Sequence[Any], *, epsilon: float = 0.2, delta: float = 0.1,
                         rule: str = "max_prob", grid: Sequence[float] | None = None, max_new_tokens: int = 64,
                         exit_layers: list[int] | None = None, log: Callable[[str], None] | None = None,
                         recorded: dict[str, Any] | None = None, batched: bool = True) -> Any:
    """Certify an early-exit threshold on calibration prompts and attach it to ``decoder.heads``
    (``batched``: see :func:`record`)."""
    import stopwise
    from stopwise.core.rules import Signal, make_rule

    if decoder.heads is None:
        raise StopwiseError("calibrate_early_exit needs a decoder with exit heads.")
    recorded = recorded or record(decoder, prompts, rule=rule, grid=grid, max_new_tokens=max_new_tokens,
                                  exit_layers=exit_layers, log=log, batched=batched)
    ident = decoder.heads.identity
    trace = to_trace(recorded, meta={"base_model": ident["base_model"], "model": ident["base_fingerprint"]})
    k = trace.n_stages
    cert = stopwise.calibrate(
        trace, Signal(signal="grid_position", stop_when="high"), epsilon=epsilon, delta=delta,
        risk=stopwise.LossMatrix(signal="disagreement"), grid=np.arange(k) / (k - 1),
    )
    decoder.heads.certificate = cert
    decoder.heads.training_info["early_exit"] = {
        "rule": make_rule(recorded["rule"]).to_config(), "grid": list(recorded["grid"]),
        "max_new_tokens": max_new_tokens, "exit_layers": exit_layers, "loss": "1 - LCS/max_len vs full greedy",
    }
    return cert


def certified_lam(cert: Any, grid: Sequence[float]) -> float | None:
    """The rule's λ a certificate picked, or None for the full model (nothing certified / last stage)."""
    if not cert.certified or cert.lam is None:
        return None
    j = int(round(cert.lam * len(grid)))
    return None if j >= len(grid) else float(grid[j])
