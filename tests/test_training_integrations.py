"""Drop-in training integrations on the real frameworks: HF Trainer, Lightning, Optuna (no mocks)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import stopwise as sw
from stopwise.training import (
    EpochPatience,
    PercentileStopping,
    certify,
    curves_to_trace,
    pruning_trace,
    read_run,
    scores_of,
)

DATA = Path(__file__).parent.parent / "benchmarks" / "data" / "training_sklearn_mlp.npz"
#: The HF recipe: a 2-layer head on MiniLM embeddings, AdamW at a constant lr, eval every EVERY steps.
K, EVERY, N_TRAIN, BATCH, LR, HIDDEN = 20, 5, 48, 16, 1e-2, 64
K_OPT = 32  # evaluations per recorded sklearn curve


# -- Optuna: a real study replaying recorded sklearn MLP curves ------------------------------------
def _recorded() -> dict[str, np.ndarray]:
    pytest.importorskip("optuna")
    if not DATA.exists():
        pytest.skip("benchmarks/data/training_sklearn_mlp.npz not recorded")
    with np.load(DATA) as d:
        return {k: d[k] for k in ("val_acc", "dataset", "seed", "lr", "width", "alpha")}


def _pruning_certificate(d: dict[str, np.ndarray]) -> sw.Certificate:
    # Searches = (digits, seed) over the 20 configurations; calibrate on seeds 0-14.
    cal = (d["dataset"] == 0) & (d["seed"] < 15)
    trace = curves_to_trace(d["val_acc"][cal].astype(np.float64), mode="max", monitor="val_acc", population="mlp-digits")
    rule = PercentileStopping.from_runs(scores_of(trace), warmup=2)
    good = pruning_trace(trace, within=0.02, groups=d["seed"][cal])
    return sw.calibrate(good, rule, epsilon=0.1, delta=0.1, risk=sw.LossMatrix(signal="pruned"))


def _study(pruner: Any, d: dict[str, np.ndarray], *, seed: int = 19, n_trials: int = 25) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = np.flatnonzero((d["dataset"] == 0) & (d["seed"] == seed))
    by_config = {(float(d["lr"][r]), float(d["width"][r]), float(d["alpha"][r])): int(r) for r in rows}

    def objective(trial: optuna.Trial) -> float:
        key = (trial.suggest_categorical("lr", [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]),
               trial.suggest_categorical("width", [16.0, 64.0]), trial.suggest_categorical("alpha", [1e-4, 1e-2]))
        curve = d["val_acc"][by_config[key]].astype(np.float64)
        trial.set_user_attr("row", by_config[key])
        for step, value in enumerate(curve):
            trial.report(float(value), step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return float(curve.max())

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0), pruner=pruner)
    study.optimize(objective, n_trials=n_trials)
    return study


def _live_stages(study: Any) -> list[int | None]:
    return [None if t.state.name == "COMPLETE" else max(t.intermediate_values) for t in study.trials]


def test_optuna_certified_pruner_prunes_and_replays_offline() -> None:
    from stopwise.training.optuna import CertifiedPruner

    d = _recorded()
    cert = _pruning_certificate(d)
    assert cert.certified
    pruner = CertifiedPruner(certificate=cert, monitor="val_acc")
    study = _study(pruner, d)
    states = [t.state.name for t in study.trials]
    assert 0 < states.count("PRUNED") < len(states) and states.count("FAIL") == 0
    assert study.best_trial.state.name == "COMPLETE"
    assert set(pruner.reasons) == {t.number for t in study.trials if t.state.name == "PRUNED"}
    assert all("fired at report" in r for r in pruner.reasons.values())
    curves = [d["val_acc"][t.user_attrs["row"]].astype(np.float64) for t in study.trials]
    live = _live_stages(study)
    assert pruner.replay(curves, direction="maximize") == live
    # The same rule code offline: rule.halts on the full curves stops where the study pruned.
    halts = cert.make_rule().halts(curves_to_trace(np.stack(curves), mode="max", monitor="val_acc", population="x"))
    assert [None if h == K_OPT - 1 else int(h) for h in halts] == live


def test_optuna_percentile_pruner_uses_completed_trials_and_replays() -> None:
    from stopwise.training.optuna import CertifiedPruner

    d = _recorded()
    pruner = CertifiedPruner.percentile(50.0, warmup=2, n_startup_trials=4, monitor="val_acc")
    study = _study(pruner, d, seed=18)
    live = _live_stages(study)
    assert all(s is None for s in live[:4])  # nothing to compare with before 4 trials completed
    assert any(s is not None for s in live)
    curves = [d["val_acc"][t.user_attrs["row"]].astype(np.float64) for t in study.trials]
    assert pruner.replay(curves, direction="maximize") == live


@pytest.mark.validity
def test_optuna_pruner_guarantee_over_random_splits_of_searches() -> None:
    """P(a run within 0.02 of its search's best is pruned) <= ε = 0.1 with prob. >= 1 - δ = 0.9:
    over 100 random 14/6 splits of the 20 digits searches, the certified rule (as the pruner runs it) prunes
    more than ε of the held-out good runs in at most δ + slack of the splits; Optuna's median rule
    (λ = 0) fails the same test."""
    from stopwise.training.optuna import CertifiedPruner

    d = _recorded()
    rows = np.flatnonzero(d["dataset"] == 0)
    acc, seeds = d["val_acc"][rows].astype(np.float64), d["seed"][rows]
    rng = np.random.default_rng(0)
    over, naive_over, reps, checked = 0, 0, 100, False
    for _ in range(reps):
        cal = np.isin(seeds, rng.permutation(20)[:14])
        trace = curves_to_trace(acc[cal], mode="max", monitor="val_acc", population="mlp-digits")
        rule = PercentileStopping.from_runs(scores_of(trace), warmup=2)
        cert = sw.calibrate(pruning_trace(trace, within=0.02, groups=seeds[cal]), rule, epsilon=0.1, delta=0.1,
                            risk=sw.LossMatrix(signal="pruned"))
        test = pruning_trace(curves_to_trace(acc[~cal], mode="max", monitor="val_acc", population="mlp-digits"),
                             within=0.02, groups=seeds[~cal])
        pruned = cert.make_rule().halts(test) < K_OPT - 1
        if not checked:  # the pruner decides as the rule does offline (one split: it is slower)
            replay = CertifiedPruner(certificate=cert, monitor="val_acc").replay(list(scores_of(test)),
                                                                                  direction="maximize")
            assert [p is not None for p in replay] == pruned.tolist()
            checked = True
        over += pruned.mean() > 0.1
        naive_over += (rule.halts(test, 0.0) < K_OPT - 1).mean() > 0.1
    slack = 3 * math.sqrt(0.1 * 0.9 / reps)
    assert over / reps <= 0.1 + slack
    assert naive_over / reps > 0.1 + slack


def test_optuna_bad_inputs() -> None:
    import optuna

    from stopwise.training.optuna import CertifiedPruner

    d = _recorded()
    cert = _pruning_certificate(d)
    with pytest.raises(sw.StopwiseError, match="monitor = 'val_acc'.*monitor = 'val_loss'"):
        CertifiedPruner(certificate=cert, monitor="val_loss")
    with pytest.raises(sw.StopwiseError, match="exactly one of"):
        CertifiedPruner(certificate=cert, patience=3, monitor="val_acc")
    study = optuna.create_study(direction="minimize", pruner=CertifiedPruner(certificate=cert, monitor="val_acc"))
    trial = study.ask()
    trial.report(0.5, 0)
    with pytest.raises(sw.StopwiseError, match="mode = 'max'.*mode = 'min'"):
        trial.should_prune()
    # A diverged trial is pruned at once, and says so.
    pruner = CertifiedPruner(patience=5, monitor="val_loss")
    study = optuna.create_study(direction="minimize", pruner=pruner)
    trial = study.ask()
    for step, v in enumerate([1.0, 0.8, float("nan")]):
        trial.report(v, step)
    assert trial.should_prune() and "became nan at report 2: diverged" in pruner.reasons[trial.number]
    off = CertifiedPruner(patience=5, monitor="val_loss", check_finite=False)
    assert off.decide([1.0, 0.8, math.inf, 0.9], mode="min") == (None, "")
    with pytest.raises(sw.StopwiseError, match="single-objective"):
        multi = optuna.create_study(directions=["minimize", "minimize"], pruner=pruner)
        t = multi.ask()
        pruner.prune(multi, multi.trials[t.number])


# -- HF Trainer: a real run on MiniLM embeddings of BBC News ---------------------------------------
@pytest.fixture(scope="module")
def one_thread() -> Any:
    # On a shared 2-core machine torch's second thread made these tiny models 7x slower.
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def embeddings(one_thread: None) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from stopwise.encoder.data import bbc_news
    from stopwise.hf.bundled import model_path

    data = bbc_news()
    rows = np.random.default_rng(0).choice(len(data.texts), size=240, replace=False)
    path = model_path("minilm")
    tok, enc = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        batch = tok([data.texts[i] for i in rows], max_length=32, truncation=True, padding=True, return_tensors="pt")
        hidden = enc(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        x = (hidden * mask).sum(1) / mask.sum(1)
    return x, torch.as_tensor(data.labels[rows])


def _head(seed: int) -> Any:
    import torch

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(384, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 5))

        def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
            logits = self.net(x)
            out = {"logits": logits}
            if labels is not None:
                out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
            return out

    torch.manual_seed(seed)
    return Head()


def _train_rows(seed: int, n_pool: int) -> Any:
    import torch

    return torch.randperm(n_pool, generator=torch.Generator().manual_seed(1000 + seed))[:N_TRAIN]


def _record_population(x: Any, y: Any, seeds: range) -> np.ndarray:
    """The recipe's eval-loss curves for many seeds at once: one batched model, the same AdamW."""
    import torch
    import torch.nn.functional as F

    xtr, ytr, xva, yva = x[:140], y[:140], x[140:], y[140:]
    heads = [_head(s) for s in seeds]
    params = [torch.stack([f(h) for h in heads]).detach().requires_grad_() for f in (
        lambda h: h.net[0].weight.T, lambda h: h.net[0].bias[None], lambda h: h.net[2].weight.T, lambda h: h.net[2].bias[None])]
    w1, b1, w2, b2 = params
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    gens = [torch.Generator().manual_seed(1000 + s) for s in seeds]
    rows = torch.stack([_train_rows(s, len(xtr)) for s in seeds])
    r = len(seeds)

    def loss_of(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        logits = torch.bmm(torch.relu(torch.bmm(xb, w1) + b1), w2) + b2
        return F.cross_entropy(logits.reshape(-1, 5), yb.reshape(-1), reduction="none").reshape(r, -1).mean(1)

    curves, step = np.zeros((r, K)), 0
    while step < K * EVERY:
        perm = torch.stack([rows[i][torch.randperm(N_TRAIN, generator=g)] for i, g in enumerate(gens)])
        for b in range(0, N_TRAIN, BATCH):
            batch = perm[:, b:b + BATCH]
            opt.zero_grad()
            loss_of(xtr[batch], ytr[batch]).sum().backward()  # a sum: each run's gradient is its own
            opt.step()
            step += 1
            if step % EVERY == 0:
                with torch.no_grad():
                    curves[:, step // EVERY - 1] = loss_of(xva.expand(r, -1, -1), yva.expand(r, -1)).numpy()
            if step == K * EVERY:
                break
    return curves


def _trainer(x: Any, y: Any, seed: int, callback: Any, tmp_path: Path, **overrides: Any) -> Any:
    import torch
    from transformers import Trainer, TrainingArguments

    class Rows(torch.utils.data.Dataset[dict[str, Any]]):
        def __init__(self, xs: torch.Tensor, ys: torch.Tensor) -> None:
            self.xs, self.ys = xs, ys

        def __len__(self) -> int:
            return len(self.xs)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"x": self.xs[i], "labels": self.ys[i]}

    rows = _train_rows(seed, 140)
    opts: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"), max_steps=K * EVERY, eval_strategy="steps", eval_steps=EVERY,
        save_strategy="no", logging_steps=EVERY, per_device_train_batch_size=BATCH, per_device_eval_batch_size=256,
        learning_rate=LR, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
        report_to="none", use_cpu=True, disable_tqdm=True, seed=seed, log_level="error")
    opts.update(overrides)
    return Trainer(model=_head(seed), args=TrainingArguments(**opts), train_dataset=Rows(x[:140][rows], y[:140][rows]),
                   eval_dataset=Rows(x[140:], y[140:]), callbacks=[callback])


@pytest.fixture(scope="module")
def hf_certificate(embeddings: tuple[Any, Any]) -> sw.Certificate:
    curves = _record_population(*embeddings, range(64))
    trace = curves_to_trace(curves, mode="min", monitor="eval_loss", population="minilm-bbc-head", bound=2.0)
    return certify(trace, EpochPatience(), epsilon=0.1, delta=0.1)


@pytest.mark.model
def test_hf_trainer_stops_by_certificate_and_restores_best(embeddings: tuple[Any, Any], hf_certificate: sw.Certificate,
                                                           tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from stopwise.training.hf import StopwiseCallback

    assert hf_certificate.certified
    cb = StopwiseCallback(certificate=hf_certificate, monitor="eval_loss", mode="min")
    trainer = _trainer(*embeddings, 7, cb, tmp_path)
    with caplog.at_level(logging.INFO, logger="stopwise.training.hf"):
        trainer.train()
    curve = read_run(trainer.state.log_history, monitor="eval_loss")
    assert trainer.state.global_step < K * EVERY and len(curve) < K
    # It stopped at the first evaluation where the certified rule fires offline on the same curve.
    rule = hf_certificate.make_rule()
    z = rule.z(curves_to_trace([curve], mode="min", monitor="eval_loss", population="minilm-bbc-head", bound=2.0))
    assert np.flatnonzero(z[0] >= rule.threshold())[0] == len(curve) - 1
    assert "stopwise stopped training" in caplog.text and cb.reason in caplog.text
    # Restore-best: the final weights are those of the best evaluation.
    best = int(np.argmin(curve))
    assert cb.run.best_stage == best and cb.best_step == (best + 1) * EVERY
    assert cb.best_weights is not None
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, cb.best_weights[k]), k
    assert trainer.evaluate()["eval_loss"] == pytest.approx(min(curve), abs=1e-6)
    # TrainerState.stateful_callbacks: HF rebuilds the callback from state() on resume.
    saved = json.loads(json.dumps(cb.state()))
    again = StopwiseCallback(**saved["args"])
    for key, value in saved["attributes"].items():
        setattr(again, key, value)
    assert (again.run.stage, again.run.best_stage, again.run.stopped) == (len(curve), best, True)


@pytest.mark.model
def test_hf_trainer_feeds_aux_metrics_to_a_learned_rule(embeddings: tuple[Any, Any], tmp_path: Path) -> None:
    from stopwise.training import fit_learned_stopping
    from stopwise.training.hf import StopwiseCallback

    curves = _record_population(*embeddings, range(64))
    population = curves_to_trace(curves, mode="min", monitor="eval_loss", population="minilm-bbc-head", bound=2.0,
                                 aux={"eval_loss": curves})
    rule = fit_learned_stopping(population, aux=["eval_loss"], log_aux=["eval_loss"], rounds=30, min_leaf=10)
    lam = float(np.quantile(-rule.z(population)[:, 8], 0.9))  # most runs can stop by evaluation 8
    cb = StopwiseCallback(rule=rule, lam=lam, monitor="eval_loss", mode="min")
    trainer = _trainer(*embeddings, 7, cb, tmp_path)
    trainer.train()
    curve = read_run(trainer.state.log_history, monitor="eval_loss")
    assert len(curve) < K
    offline = rule.with_lam(lam).halts(curves_to_trace([curve], mode="min", monitor="eval_loss", population="x",
                                                       bound=2.0, aux={"eval_loss": [curve]}))
    assert int(offline[0]) == len(curve) - 1  # it stopped where the rule fires offline on the same values
    assert cb.run.aux_history == {"eval_loss": curve}
    other = fit_learned_stopping(curves_to_trace(curves, mode="min", monitor="eval_loss", population="p", bound=2.0,
                                                 aux={"eval_accuracy": 1.0 - curves / 4}), aux=["eval_accuracy"], rounds=2)
    with pytest.raises(sw.StopwiseError, match="reads \\['eval_accuracy'\\] beside 'eval_loss'"):
        _trainer(*embeddings, 3, StopwiseCallback(rule=other, lam=0.0, monitor="eval_loss", mode="min"), tmp_path).train()


@pytest.mark.model
def test_hf_patience_baseline_and_bad_inputs(embeddings: tuple[Any, Any], hf_certificate: sw.Certificate,
                                             tmp_path: Path) -> None:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from stopwise.training.hf import StopwiseCallback

    with pytest.raises(sw.StopwiseError, match="'eval_acc', which is not in the evaluation metrics.*'eval_loss'"):
        _trainer(*embeddings, 3, StopwiseCallback(patience=2, monitor="eval_acc"), tmp_path).train()
    with pytest.raises(sw.StopwiseError, match="mode = 'min'.*mode = 'max'"):
        StopwiseCallback(certificate=hf_certificate, monitor="eval_loss", mode="max")
    with pytest.raises(sw.StopwiseError, match="monitor = 'eval_loss'.*monitor = 'eval_accuracy'"):
        StopwiseCallback(certificate=hf_certificate, monitor="eval_accuracy")
    with pytest.raises(sw.StopwiseError, match="needs TrainingArguments\\(load_best_model_at_end=True\\)"):
        _trainer(*embeddings, 3, StopwiseCallback(patience=2, restore_best="checkpoint"), tmp_path).train()
    with pytest.raises(sw.StopwiseError, match="'min_delta' parameter of StopwiseCallback applies to 'patience'"):
        StopwiseCallback(certificate=hf_certificate, min_delta=0.1)
    # A diverged run stops at once and says so (real TrainerState / TrainerControl objects).
    cb = StopwiseCallback(patience=5)
    args, state, control = TrainingArguments(output_dir=str(tmp_path / "nan"), report_to="none"), TrainerState(), \
        TrainerControl()
    cb.on_train_begin(args, state, control)
    for step, value in enumerate([1.0, 0.9, float("nan")]):
        state.global_step = step + 1
        cb.on_evaluate(args, state, control, metrics={"eval_loss": value, "eval_runtime": 0.1})
    assert control.should_training_stop and "diverged" in cb.reason and cb.best_step == 2
    # A dict of eval datasets: one on_evaluate per set; the other sets' calls are not errors, a
    # round in which no set reports the metric is.
    multi, lost = StopwiseCallback(patience=5, monitor="eval_val_loss"), StopwiseCallback(patience=5, monitor="eval_loss")
    for c in (multi, lost):
        c.on_train_begin(args, TrainerState(), TrainerControl())
    for step in (5, 10):
        state.global_step = step
        for name in ("test", "val"):
            multi.on_evaluate(args, state, control, metrics={f"eval_{name}_loss": 1.0 / step, f"eval_{name}_runtime": 0.1})
    assert multi.run.history == [0.2, 0.1]
    lost.on_evaluate(args, state, control, metrics={"eval_val_loss": 1.0, "eval_val_runtime": 0.1})
    state.global_step = 15
    with pytest.raises(sw.StopwiseError, match="evaluation at step 10 reported only the eval sets \\['eval_val'\\]"):
        lost.on_evaluate(args, state, control, metrics={"eval_val_loss": 1.0, "eval_val_runtime": 0.1})
    # The patience baseline on a real run, the Trainer's own load_best_model_at_end restoring the best.
    with pytest.raises(sw.StopwiseError, match="metric_for_best_model = 'eval_acc'.*monitors 'eval_loss'"):
        _trainer(*embeddings, 11, StopwiseCallback(patience=2, restore_best="checkpoint"), tmp_path,
                 load_best_model_at_end=True, save_strategy="steps", save_steps=EVERY, metric_for_best_model="acc",
                 greater_is_better=True).train()
    base = StopwiseCallback(patience=2, min_delta=1e-3, restore_best="checkpoint")
    trainer = _trainer(*embeddings, 11, base, tmp_path, load_best_model_at_end=True, save_strategy="steps",
                       save_steps=EVERY, metric_for_best_model="eval_loss", greater_is_better=False)
    trainer.train()
    curve = read_run(trainer.state.log_history, monitor="eval_loss")
    assert len(curve) < K and base.reason.startswith("patience 2 reached") and base.best_weights is None
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{base.best_step}")
    assert trainer.evaluate()["eval_loss"] == pytest.approx(curve[base.run.best_stage], abs=1e-6)
    # Resuming from the last checkpoint rebuilds the callback from TrainerState.stateful_callbacks.
    last = f"{tmp_path}/out/checkpoint-{trainer.state.global_step}"
    resumed = _trainer(*embeddings, 11, StopwiseCallback(patience=2, min_delta=1e-3, restore_best="checkpoint"), tmp_path,
                       load_best_model_at_end=True, save_strategy="steps", save_steps=EVERY,
                       metric_for_best_model="eval_loss", greater_is_better=False,
                       restore_callback_states_from_checkpoint=True)
    resumed.train(resume_from_checkpoint=last)
    again = next(c for c in resumed.callback_handler.callbacks if isinstance(c, StopwiseCallback))
    assert again.run.history == curve and again.reason == base.reason
    assert resumed.state.global_step <= trainer.state.global_step + EVERY


@pytest.mark.model
def test_hf_memory_restore_survives_resuming(embeddings: tuple[Any, Any], tmp_path: Path) -> None:
    """restore_best="memory" keeps the best in each checkpoint: a resumed run restores a best reached before."""
    import shutil

    import torch

    from stopwise.training.hf import BEST_MARKER, BEST_WEIGHTS, StopwiseCallback

    saving: dict[str, Any] = dict(save_strategy="steps", save_steps=EVERY, restore_callback_states_from_checkpoint=True)
    first = StopwiseCallback(patience=2, min_delta=1e-3)
    trainer = _trainer(*embeddings, 11, first, tmp_path, **saving)
    trainer.train()
    assert first.reason.startswith("patience 2 reached") and first.best_weights is not None
    best, last = first.best_step, trainer.state.global_step
    assert best is not None and best < last
    out = tmp_path / "out"
    # The best's own checkpoint holds it already (a marker, no second copy); later ones carry a copy.
    assert (out / f"checkpoint-{best}" / BEST_MARKER).is_file()
    assert not (out / f"checkpoint-{best}" / BEST_WEIGHTS).exists()
    assert (out / f"checkpoint-{last}" / BEST_WEIGHTS).is_file()

    def resume(step: int) -> tuple[Any, StopwiseCallback]:
        again = _trainer(*embeddings, 11, StopwiseCallback(patience=2, min_delta=1e-3), tmp_path, **saving)
        again.train(resume_from_checkpoint=str(out / f"checkpoint-{step}"))
        cb = next(c for c in again.callback_handler.callbacks if isinstance(c, StopwiseCallback))
        return again, cb

    # From the last checkpoint (the run had stopped): the weights of the best step, bit for bit.
    resumed, cb = resume(last)
    assert cb.best_step == best and cb.reason == first.reason
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, first.best_weights[k]), k
    # From the best's own checkpoint: training goes on from there and ends on its own best, restored.
    resumed, cb = resume(best)
    assert cb.best_weights is not None and cb.best_step is not None and cb.best_step >= best
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, cb.best_weights[k]), k
    # A checkpoint without the files cannot restore the old best: a clear error, not the last weights.
    for name in (BEST_WEIGHTS, BEST_MARKER):
        (out / f"checkpoint-{last}" / name).unlink()
    shutil.rmtree(out / f"checkpoint-{best}")
    with pytest.raises(sw.StopwiseError, match=f"cannot restore the best weights \\(step {best}.*{BEST_WEIGHTS}"):
        resume(last)


def test_certificate_of_another_kind_is_refused() -> None:
    pytest.importorskip("optuna")
    from stopwise.training.optuna import CertifiedPruner

    cert = sw.calibrate(sw.synthetic.synthetic_trace(400, seed=0), sw.MaxProb(), epsilon=0.2, delta=0.2)
    with pytest.raises(sw.StopwiseError, match="not calibrated on learning curves.*task_format = None"):
        CertifiedPruner(certificate=cert, monitor="val_acc")


# -- Lightning: a real Trainer on sklearn's digits ----------------------------------------------------
def _digits_module(*, nan_from: int | None = None) -> tuple[Any, Any, Any]:
    pl = pytest.importorskip("lightning.pytorch")
    import torch
    from sklearn.datasets import load_digits

    xs, ys = load_digits(return_X_y=True)
    x, y = torch.tensor(xs / 16.0, dtype=torch.float32), torch.tensor(ys)
    order = np.random.default_rng(0).permutation(len(x))

    def loader(rows: np.ndarray, shuffle: bool) -> Any:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[rows], y[rows]), batch_size=50, shuffle=shuffle)

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

        def training_step(self, batch: Any, i: int) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch: Any, i: int) -> None:
            loss = torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            if nan_from is not None and self.current_epoch >= nan_from:
                loss = loss * float("nan")
            self.log("val_loss", loss)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    pl.seed_everything(0, verbose=False)
    return Net(), loader(order[:150], True), loader(order[150:450], False)


def _pl_trainer(callback: Any, **kw: Any) -> Any:
    import lightning.pytorch as pl

    opts = dict(max_epochs=60, callbacks=[callback], logger=False, enable_progress_bar=False, enable_checkpointing=False,
                enable_model_summary=False, accelerator="cpu")
    opts.update(kw)
    return pl.Trainer(**opts)


@pytest.mark.model
def test_lightning_stops_restores_best_and_resumes(one_thread: None, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from stopwise.training.lightning import StopwiseEarlyStopping

    model, train, val = _digits_module()
    cb = StopwiseEarlyStopping(rule=EpochPatience(min_delta=1e-3), lam=3, monitor="val_loss", mode="min")
    trainer = _pl_trainer(cb)
    with caplog.at_level(logging.INFO, logger="stopwise.training.lightning"):
        trainer.fit(model, train, val)
    hist = cb.run.history
    assert trainer.current_epoch < 59 and cb.stopped_epoch == len(hist) - 1 and "patience 3 reached" in caplog.text
    assert EpochPatience(min_delta=1e-3).halts(curves_to_trace([hist], mode="min", monitor="val_loss", population="d",
                                                               bound=5.0), 3)[0] == len(hist) - 1
    best = cb.run.best_stage
    assert cb.best_epoch == best and cb.best_weights is not None
    for k, v in model.state_dict().items():
        assert torch.equal(v, cb.best_weights[k]), k
    assert trainer.validate(model, val, verbose=False)[0]["val_loss"] == pytest.approx(hist[best], abs=1e-6)
    # The callback's state rides in the checkpoint; a resumed fit keeps the decision and the best.
    path = tmp_path / "stopped.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"][cb.state_key]
    assert saved["monitor"]["history"] == hist
    fresh, _, _ = _digits_module()
    cb2 = StopwiseEarlyStopping(rule=EpochPatience(min_delta=1e-3), lam=3, monitor="val_loss", mode="min")
    again = _pl_trainer(cb2, max_epochs=80)
    again.fit(fresh, train, val, ckpt_path=path)
    assert again.current_epoch <= trainer.current_epoch + 2 and cb2.run.best_stage == best
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, cb.best_weights[k]), k


@pytest.mark.model
def test_lightning_bad_inputs(one_thread: None) -> None:
    from stopwise.training.lightning import StopwiseEarlyStopping

    model, train, val = _digits_module()
    with pytest.raises(sw.StopwiseError, match="'val_acc', which is not among the logged metrics.*'val_loss'"):
        _pl_trainer(StopwiseEarlyStopping(patience=3, monitor="val_acc", mode="max")).fit(model, train, val)
    model, train, val = _digits_module(nan_from=2)
    cb = StopwiseEarlyStopping(patience=10)
    trainer = _pl_trainer(cb)
    trainer.fit(model, train, val)
    assert cb.stopped_epoch == 2 and "val_loss became nan at evaluation 2: diverged" in cb.reason
    assert cb.best_epoch in (0, 1) and trainer.current_epoch <= 3
    curves = np.linspace(1.0, 0.5, 40).reshape(4, 10) + np.arange(4)[:, None] * 0.01
    cert = certify(curves_to_trace(curves, mode="min", monitor="val_loss", population="p", bound=1.0), EpochPatience(),
                   epsilon=0.5, delta=0.5)
    with pytest.raises(sw.StopwiseError, match="mode = 'min'.*mode = 'max'"):
        StopwiseEarlyStopping(certificate=cert, monitor="val_loss", mode="max")
    with pytest.raises(sw.StopwiseError, match="monitor = 'val_loss'.*monitor = 'train_loss'"):
        StopwiseEarlyStopping(certificate=cert, monitor="train_loss")
