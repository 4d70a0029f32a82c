"""The training loop: Algorithm 1 of the paper, end to end (RELORA_SPEC.md sections 6-7).

``train(config)`` reads top to bottom: set up data and model, restore a
checkpoint if resuming, then for each optimizer step: switch from the
full-rank warm start to ReLoRA when due, accumulate gradients over
micro-batches, clip, step, advance the schedule, let the controller merge /
prune / restart, log, evaluate, save. At the end: evaluate, save, export a
dense Hugging Face model with the last cycle merged.

Everything that is not the loop lives in ``relora.run``: the model of a run
(``build``), its optimizer phases (``phase``), the state it checkpoints
(``state``), its data (``inputs``), the device, the dense export and the summary.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from relora.core import sharding
from relora.core.adapters import decay_frozen_
from relora.core.config import ReLoRAConfig
from relora.core.controller import StepEvent
from relora.core.optimizer_state import optimizer_state_bytes
from relora.data import TokenWindows
from relora.errors import ConfigError, DivergedError
from relora.fileio import write_json_atomic
from relora.models import count_parameters
from relora.run import checkpoint as ckpt
from relora.run import distributed
from relora.run.build import gathered_model, prepare_for_training, run_model
from relora.run.config import PROJECTION_METHODS, TrainConfig
from relora.run.device import (
    autocast_for,
    peak_memory_bytes,
    pick_device,
    reset_peak_memory,
)
from relora.run.distributed import Dist
from relora.run.evaluation import evaluate, lm_loss, perplexity
from relora.run.export import export_dense, reference_step, save_reference
from relora.run.inputs import RunData, load_run_data
from relora.run.logbook import Logbook
from relora.run.merge_eval import MergeLosses, controller_step, merge_eval_windows
from relora.run.phase import Phase, build_phase, rescale_lr, switch_to_adapters
from relora.run.state import RunState
from relora.run.summary import RunSummary
from relora.run.threads import apply_threads
from relora.run.watch import SpikeWatch, StopOnSignal

__all__ = ["DivergedError", "RunSummary", "train"]

logger = logging.getLogger(__name__)


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> RunSummary:
    """Run (or resume) a training run described by ``cfg`` into ``cfg.out``.

    Under torchrun every rank calls this; only rank 0 writes the run directory.
    A run that diverges rolls back to its latest checkpoint with a lower LR.
    """
    dist = distributed.setup(cfg.distributed, pick_device(cfg.device), cfg.dist_timeout_s)
    rollbacks, lr_scale = 0, None
    try:
        while True:
            try:
                return _train(cfg, dist, resume=resume, progress=progress, lr_scale=lr_scale)
            except _TooManyBadSteps as bad:
                checkpoint = ckpt.latest_checkpoint(Path(cfg.out) / "checkpoints", verify=True)
                if cfg.on_bad_steps == "stop" or rollbacks >= cfg.max_rollbacks or checkpoint is None:
                    why = ("--on-bad-steps stop" if cfg.on_bad_steps == "stop" else
                           "no checkpoint to roll back to" if checkpoint is None else f"{rollbacks} rollbacks done")
                    raise DivergedError(
                        f"{cfg.max_bad_steps + 1} consecutive steps had a non-finite loss or gradient norm, up to "
                        f"step {bad.step} ({why}); lower --lr, raise --restart-warmup-steps or check the data"
                    ) from None
                rollbacks, lr_scale = rollbacks + 1, bad.lr_scale * cfg.rollback_lr_factor
                logger.warning("rollback %d: back to %s with the LR scaled by %.3g", rollbacks, checkpoint.name,
                               lr_scale)
                resume = True
    finally:
        dist.close()


def _train(cfg: TrainConfig, dist: Dist, *, resume: bool, progress: bool, lr_scale: float | None) -> RunSummary:
    """One attempt at the run; ``lr_scale`` (set by a rollback) overrides the LR scale the checkpoint recorded."""
    run = setup(cfg, dist, resume=resume)
    cfg = run.cfg  # the data path resolved
    net, state = restore(run, resume=resume, lr_scale=lr_scale)
    book = Logbook(cfg, step=state.step, main=dist.is_main, progress=progress)
    started = time.perf_counter() - state.wall_s  # the wall clock goes on from the checkpoint's
    spikes = SpikeWatch(run.relora_cfg.restart_warmup_steps if run.relora_cfg else 0)
    if state.spike_watch is not None:  # absent in checkpoints written before it was saved
        spikes.load_state_dict(state.spike_watch)
    notes: list[str] = []
    with StopOnSignal() as stop, book:
        while state.step < cfg.steps:
            if state.step == reference_step(cfg):
                save_reference(cfg, run.relora_cfg, net.model, dist, vocab_size=run.vocab_size,
                               wrapped=net.phase.wrapped)
            if run.relora_cfg is not None and state.step == cfg.relora_phase_start and not net.phase.wrapped:
                switch(run, net, state)
            result = train_step(run, net, state, stop)
            spikes.observe(state.step, result.loss, result.event, net.phase.controller)
            record = log(run, net, state, result, book)
            if _due(cfg.eval_every, state.step, cfg.steps):
                record = validate(run, net, state, record)
                book.restart_clock()  # evaluation time is not training throughput
            book.write(record, state.step)
            if _due(cfg.save_every, state.step, cfg.steps) or result.stop:
                save(run, net, state, spikes, started)
            if result.stop:
                notes.append(f"interrupted at step {state.step}; continue with --resume")
                break
    book.close()
    summary = finish(run, net, state, started, notes)
    summary.stop_requested = stop.requested
    return summary


@dataclass
class _Run:
    """What a run fixes before its first step."""

    cfg: TrainConfig
    dist: Dist
    relora_cfg: ReLoRAConfig | None  # built once; None for the methods without adapters
    data: RunData
    micro_steps: int  # micro-batches per optimizer step on each rank
    autocast: contextlib.AbstractContextManager
    run_dir: Path = field(init=False)
    checkpoints: Path = field(init=False)
    vocab_size: int = field(init=False)
    tokens_per_step: int = field(init=False)
    rank_sequences: int = field(init=False)  # each rank's share of a step's sequences

    def __post_init__(self) -> None:
        self.run_dir, self.vocab_size = Path(self.cfg.out), self.data.prepared.vocab_size
        self.checkpoints = self.run_dir / "checkpoints"
        self.tokens_per_step = self.cfg.sequences_per_step * self.cfg.seq_len
        self.rank_sequences = self.cfg.sequences_per_step // self.dist.world_size


@dataclass
class _Trainee:
    """The model under training: ``model`` is what the math works on, ``engine`` what forward and backward
    run on (the model under DDP or FSDP2, maybe compiled), ``phase`` its optimizer, schedule and controller."""

    model: nn.Module
    engine: nn.Module | None
    phase: Phase


@dataclass
class _StepResult:
    """What one optimizer step measured."""

    loss: float  # mean over the step's micro-batches and ranks
    grad_norm: float  # before clipping
    lr: float  # the LR the step ran with
    event: StepEvent | None  # what the controller did after it
    stop: bool  # a rank was asked to stop (SIGINT/SIGTERM)
    optimizer_state_bytes: int
    merge_losses: MergeLosses | None = None  # with --eval-merges, at a merge


def setup(cfg: TrainConfig, dist: Dist, *, resume: bool) -> _Run:
    """Check the config against the world size, load the data, build the ReLoRA config once."""
    autocast = autocast_for(dist.device)
    relora_cfg = cfg.relora_config()
    micro_steps = cfg.micro_steps(dist.world_size)
    if dist.sharded and cfg.method in PROJECTION_METHODS:
        raise ConfigError(f"--method {cfg.method} needs whole gradients for its projection and does not run "
                          "under FSDP; use --distributed ddp")
    data = load_run_data(cfg, check_identity=resume)
    # stored resolved and with its identity: a resume from another directory or by another path finds it
    cfg = replace(cfg, data=str(data.prepared.path.resolve()), data_id=data.prepared.identity)
    return _Run(cfg, dist, relora_cfg, data, micro_steps, autocast)


def restore(run: _Run, *, resume: bool, lr_scale: float | None) -> tuple[_Trainee, RunState]:
    """The model, its phase and the run state to start from: a fresh run's, or the latest checkpoint's."""
    cfg, dist = run.cfg, run.dist
    reset_peak_memory(dist.device)
    # the checkpoint first: whether it is past the warm start decides whether the model has adapters
    restored = dist.broadcast_object(ckpt.latest_checkpoint(run.checkpoints, verify=True) if resume else None)
    state = RunState(vocab_size=run.vocab_size, world_size=dist.world_size)
    if restored is not None:
        state = RunState.from_dict({**ckpt.read_trainer_state(restored), "world_size": dist.world_size})
    model = run_model(cfg, run.relora_cfg, run.vocab_size, wrapped=state.wrapped)
    if dist.device.type == "cpu" or cfg.threads > 0:  # after the data and model checks: a user error is all that prints
        apply_threads(cfg.threads)
    ckpt.seed_rng_states(cfg.seed, dist.rank)  # dropout repeats with the seed; a resume restores the saved states
    if restored is not None and not ckpt.is_sharded(restored):
        ckpt.load_weights(model, restored)
    model.to(dist.device).train()
    engine = dist.parallelize(prepare_for_training(cfg, model))
    phase = build_phase(cfg, model, wrapped=state.wrapped, relora_cfg=run.relora_cfg)
    if restored is not None:
        _load_states(run, restored, model, phase, state, lr_scale)
    elif resume:
        logger.warning("no complete checkpoint in %s: starting from step 0", run.checkpoints)
    return _Trainee(model, engine, phase), state


def _load_states(run: _Run, restored: Path, model: nn.Module, phase: Phase, state: RunState,
                 lr_scale: float | None) -> None:
    """Optimizer, schedule, controller and RNG states of a checkpoint; the LR scaled as a rollback asks."""
    dist = run.dist
    saved = ckpt.load_states(restored)
    if ckpt.is_sharded(restored):
        ckpt.load_sharded(restored, model, phase.optimizer)
    else:
        phase.optimizer.load_state_dict(saved["optimizer"])
    phase.scheduler.load_state_dict(saved["scheduler"])
    if phase.controller is not None:
        phase.controller.load_state_dict(saved["controller"])
    ckpt.restore_rng_states(saved["rng"], rank=dist.rank, world_size=dist.world_size,
                            device=dist.device if dist.active else None)
    target_scale = lr_scale if lr_scale is not None else state.scale
    rescale_lr(phase, target_scale / state.scale)
    state.lr_scale = target_scale
    logger.info("resumed from %s (step %d)", restored, state.step)


def switch(run: _Run, net: _Trainee, state: RunState) -> None:
    """End of the warm start: the model gets its adapters, the optimizer and schedule their second phase."""
    net.engine = None  # DDP's hooks on the old parameter set go with it
    net.model, net.engine, net.phase = switch_to_adapters(run.cfg, run.relora_cfg, net.model, net.phase, run.dist,
                                                          run.vocab_size)
    rescale_lr(net.phase, state.scale)
    state.wrapped = True
    logger.info("step %d: switched to %s (%s)", state.step, run.cfg.method, _param_counts(net.model))


def train_step(run: _Run, net: _Trainee, state: RunState, stop: StopOnSignal) -> _StepResult:
    """One optimizer step: accumulate, clip, update (skipped if non-finite), schedule, then the controller's
    merge / prune / restart (Algorithm 1's loop body)."""
    cfg, phase = run.cfg, net.phase
    lr = phase.optimizer.param_groups[0]["lr"]
    step_start = time.perf_counter()
    loss_sum = _accumulate_gradients(run, net, state.step)
    trainable = [p for p in net.model.parameters() if p.requires_grad]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf  # 0: no clipping (GaLore's, APOLLO's scripts)
    grad_norm = float(sharding.full(torch.nn.utils.clip_grad_norm_(trainable, max_norm)))
    # one collective per step: the global mean loss, and whether any rank was asked to stop
    loss_total, stops = run.dist.all_reduce([loss_sum, float(stop.requested)])
    loss = loss_total / (run.micro_steps * run.dist.world_size)
    if math.isfinite(grad_norm) and math.isfinite(loss):
        phase.optimizer.step()
        if phase.wrapped and cfg.weight_decay:  # W + s B A decays as a full-rank weight (pruning.decay_groups)
            decay_frozen_(net.model, 1.0 - lr * cfg.weight_decay)
        state.bad_streak = 0
    else:  # a non-finite loss or gradient: skip the update, keep the run alive
        state.skipped_steps += 1
        state.bad_streak += 1
        logger.warning("step %d: non-finite loss or gradient norm, update skipped (%d in a row)",
                       state.step, state.bad_streak)
        if state.bad_streak > cfg.max_bad_steps:
            raise _TooManyBadSteps(state.step, state.scale)
    phase.optimizer.zero_grad(set_to_none=True)
    phase.scheduler.step()
    state.step += 1
    state.tokens += run.tokens_per_step
    measure = partial(_evaluate, run, net.model, run.data.val, merge_eval_windows(cfg)) if cfg.eval_merges else None
    event, merge_losses = controller_step(phase.controller, state.step, measure)
    state.train_s += time.perf_counter() - step_start - (merge_losses.seconds if merge_losses else 0.0)
    state_bytes = optimizer_state_bytes(phase.optimizer)  # after the step: the state exists from step 1
    state.peak_optimizer_state_bytes = max(state.peak_optimizer_state_bytes, state_bytes)
    return _StepResult(loss, grad_norm, lr, event, stops > 0, state_bytes, merge_losses)


def _accumulate_gradients(run: _Run, net: _Trainee, step: int) -> float:
    """Forward and backward over this rank's micro-batches of ``step``; the sum of their losses."""
    cfg, dist, data = run.cfg, run.dist, run.data
    loss_sum = 0.0
    for micro in range(run.micro_steps):
        # this rank's slice of the step's global batch: the same sequences whatever the world size
        first = step * cfg.sequences_per_step + dist.rank * run.rank_sequences + micro * cfg.micro_batch
        ids = np.arange(first, first + cfg.micro_batch)
        batch = data.train.get(data.order[ids] if data.order is not None else ids).to(dist.device)
        with dist.gradient_sync(net.engine, enabled=micro == run.micro_steps - 1):
            with run.autocast:
                loss = lm_loss(net.engine, batch)
            (loss / run.micro_steps).backward()
        loss_sum += loss.item()
    return loss_sum


def log(run: _Run, net: _Trainee, state: RunState, result: _StepResult, book: Logbook) -> dict | None:
    """Add the step to the logging window; its record every ``log_every`` steps, at merges and at the end."""
    state.window_loss += result.loss
    state.window_steps += 1
    book.tick()
    step, event, controller = state.step, result.event, net.phase.controller
    if not (step % run.cfg.log_every == 0 or step == run.cfg.steps or (event is not None and event.merged)):
        return None
    if result.merge_losses is not None:  # evaluation time is not training throughput
        book.window_start += result.merge_losses.seconds
    record = {
        "step": step, "tokens": state.tokens, "loss": state.window_loss / state.window_steps, "lr": result.lr,
        "grad_norm": result.grad_norm, "tokens_per_s": book.tokens_per_s(run.tokens_per_step),
        "peak_mem_bytes": int(run.dist.all_reduce([peak_memory_bytes(run.dist.device)], op="max")[0]),
        "optimizer_state_bytes": result.optimizer_state_bytes,
        "restarts": controller.restarts if controller else 0,
        "merges": controller.merges if controller else 0,
        "pruned_fraction": controller.last_pruned_fraction if controller else None,
        "restart": bool(event and event.restarted),
        "wrapped": net.phase.wrapped,
    }
    if result.merge_losses is not None:
        record.update(result.merge_losses.record())
    book.show(record)
    state.window_loss, state.window_steps = 0.0, 0
    book.restart_clock()
    return record


def validate(run: _Run, net: _Trainee, state: RunState, record: dict | None) -> dict:
    """The validation loss at this step, added to the step's record (or to a record of its own)."""
    val_loss = _evaluate(run, net.model, run.data.val)
    record = record or {"step": state.step, "tokens": state.tokens}
    record.update(val_loss=val_loss, val_ppl=perplexity(val_loss))
    if run.dist.is_main:  # the CLI's handler writes it above the progress bar
        logger.info("step %d: val loss %.4f, val ppl %.2f", state.step, val_loss, record["val_ppl"])
    state.val_loss = val_loss
    return record


def _evaluate(run: _Run, model: nn.Module, windows: TokenWindows, num_windows: int | None = None) -> float:
    """The mean loss of ``num_windows`` windows spread over ``windows`` (default: those of ``eval_tokens``)."""
    cfg, dist = run.cfg, run.dist
    num_windows = num_windows or max(1, cfg.eval_tokens // cfg.seq_len)
    return evaluate(model, windows, num_windows=num_windows, micro_batch=cfg.micro_batch,
                    device=dist.device, autocast=run.autocast, rank=dist.rank, world_size=dist.world_size,
                    reduce=dist.all_reduce)


def save(run: _Run, net: _Trainee, state: RunState, spikes: SpikeWatch, started: float) -> Path:
    """Checkpoint the step: weights, optimizer, schedule, controller, RNG states and the run state."""
    phase = net.phase
    state.wall_s = time.perf_counter() - started
    state.spike_watch = spikes.state_dict()
    states = {"scheduler": phase.scheduler.state_dict()}
    if not run.dist.sharded:
        states["optimizer"] = phase.optimizer.state_dict()
    if phase.controller is not None:
        states["controller"] = phase.controller.state_dict()
    return ckpt.save_checkpoint(run.checkpoints, state.step, model=net.model, states=states,
                                trainer_state=state.to_dict(), config=run.cfg.to_dict(), keep=run.cfg.keep_checkpoints,
                                dist=run.dist if run.dist.active else None, optimizer=phase.optimizer)


def finish(run: _Run, net: _Trainee, state: RunState, started: float, notes: list[str]) -> RunSummary:
    """After the last step: the test loss, the dense export, and summary.json (only if the run finished)."""
    cfg, dist, controller = run.cfg, run.dist, net.phase.controller
    interrupted = state.step < cfg.steps
    trainable, total = count_parameters(net.model)  # before export, which removes the adapters
    test_loss = None
    if not interrupted and run.data.test is not None:  # held out from tuning: read once, after the last step
        test_loss = _evaluate(run, net.model, run.data.test)
    if not interrupted:
        dense = gathered_model(cfg, run.relora_cfg, net.model, dist, vocab_size=run.vocab_size,
                               wrapped=net.phase.wrapped)
        if dense is not None:
            export_dense(dense, run.data.prepared.tokenizer(), run.run_dir / "final")
    summary = RunSummary(
        run_dir=run.run_dir, method=cfg.method, steps=state.step, tokens=state.tokens,
        wall_s=time.perf_counter() - started, trainable_params=trainable, total_params=total,
        restarts=controller.restarts if controller else 0, merges=controller.merges if controller else 0,
        peak_mem_bytes=int(dist.all_reduce([peak_memory_bytes(dist.device)], op="max")[0]),
        optimizer_state_bytes=optimizer_state_bytes(net.phase.optimizer),
        peak_optimizer_state_bytes=state.peak_optimizer_state_bytes,
        tokens_per_s=state.tokens / state.train_s if state.train_s else None,
        val_loss=state.val_loss, val_ppl=perplexity(state.val_loss) if state.val_loss is not None else None,
        test_loss=test_loss, test_ppl=perplexity(test_loss) if test_loss is not None else None,
        skipped_steps=state.skipped_steps, interrupted=interrupted, notes=notes,
    )
    if not interrupted and dist.is_main:  # written last: it means the run finished (relora compare relies on it)
        write_json_atomic(run.run_dir / "summary.json", summary.to_dict())
    dist.barrier()
    return summary


class _TooManyBadSteps(Exception):
    """More consecutive non-finite steps than ``max_bad_steps``: ``train`` rolls back or gives up."""

    def __init__(self, step: int, lr_scale: float) -> None:
        super().__init__(step)
        self.step, self.lr_scale = step, lr_scale


def _due(every: int, step: int, last: int) -> bool:
    """Every ``every`` steps (0: never) and at the last step."""
    return bool(every and step % every == 0) or step == last


def _param_counts(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"{trainable:,} trainable of {total:,} parameters"
