"""The training loop: Algorithm 1 of the paper, end to end (RELORA_SPEC.md sections 6-7).

``train(config)`` reads top to bottom: set up data and model, restore a
checkpoint if resuming, then for each optimizer step: switch from the
full-rank warm start to ReLoRA when due, accumulate gradients over
micro-batches, clip, step, advance the schedule, let the controller merge /
prune / restart, log, evaluate, save. At the end: evaluate, save, export a
dense Hugging Face model with the last cycle merged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from relora.core import sharding
from relora.core.adapters import (
    decay_frozen_,
    load_merge_residuals,
    merge_residuals,
    unwrap,
    wrap,
)
from relora.core.controller import ReLoRA
from relora.core.optimizer_state import optimizer_state_bytes
from relora.core.schedule import jagged_cosine_scheduler
from relora.core.weight_decay import decay_groups
from relora.data import TokenWindows, load_prepared
from relora.errors import ConfigError, DivergedError
from relora.fileio import ownership, swap_dir, write_json_atomic, write_text_atomic
from relora.models import (
    build_model,
    control_model_config,
    count_parameters,
    enable_activation_checkpointing,
    llama_config,
    load_pretrained,
)
from relora.run import checkpoint as ckpt
from relora.run import distributed
from relora.run.config import ADAPTER_METHODS, PROJECTION_METHODS, TrainConfig
from relora.run.distributed import Dist
from relora.run.evaluation import evaluate, lm_loss, perplexity
from relora.run.threads import apply_threads
from relora.run.tracking import finish_wandb, log_wandb, start_wandb

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What a finished (or interrupted) run reports."""

    run_dir: Path
    method: str
    steps: int
    tokens: int
    wall_s: float
    trainable_params: int
    total_params: int
    restarts: int
    merges: int
    peak_mem_bytes: int
    optimizer_state_bytes: int = 0  # measured at the end of the run (the method's steady state)
    peak_optimizer_state_bytes: int = 0  # the largest measured during the run (a warm start's full AdamW)
    tokens_per_s: float | None = None  # training throughput, evaluation and checkpointing excluded
    val_loss: float | None = None
    val_ppl: float | None = None
    test_loss: float | None = None  # once, at the end, on the test split's fixed windows; None: the data has none
    test_ppl: float | None = None
    skipped_steps: int = 0
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["run_dir"] = str(self.run_dir)
        return values


def finished_summary(run_dir: Path) -> RunSummary | None:
    """The summary of a finished run (summary.json is written last), None if the run is not finished."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    known = {f.name for f in fields(RunSummary)}
    try:
        saved = json.loads(path.read_text())
        return RunSummary(**{**{k: v for k, v in saved.items() if k in known}, "run_dir": run_dir})
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path} is damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                          "the run finished: its model is in final/") from None


@dataclass
class _Phase:
    """What changes at the switch from the warm start to ReLoRA."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    controller: ReLoRA | None
    wrapped: bool


class _StopOnSignal:
    """First SIGINT/SIGTERM asks the loop to checkpoint and stop after the current
    step (never mid-step, so the checkpoint is consistent); a second one stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s received: saving a checkpoint after this step", signal.Signals(signum).name)

    def __enter__(self) -> _StopOnSignal:
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return torch.device(name)


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPUs that support it (float32 master weights); float32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak-memory count afresh, so that a run in a process that ran others (``relora compare``)
    reports its own peak. On CPU, Linux resets the process's peak RSS on writing 5 to clear_refs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def make_model(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    """The model this method trains: from --init-from, the control size, or the preset."""
    if cfg.init_from:
        model = model_from_path(cfg.init_from)
        if model.get_input_embeddings().num_embeddings < vocab_size:
            raise ConfigError(
                f"the data's vocabulary ({vocab_size}) is larger than the model's embedding "
                f"({model.get_input_embeddings().num_embeddings}); prepare the data with the model's tokenizer"
            )
        positions = learned_positions(model)
        if positions is not None and cfg.seq_len > positions:
            raise ConfigError(f"--seq-len {cfg.seq_len} is longer than the {positions} positions {type(model).__name__} "
                              f"has learned embeddings for; use --seq-len {positions} or less")
        return model
    arch = cfg.model
    if cfg.method == "control":
        arch = control_model_config(cfg.model, vocab_size, cfg.rank)
    return build_model(llama_config(arch, vocab_size, cfg.seq_len), cfg.seed)


def learned_positions(model: nn.Module) -> int | None:
    """How many positions a model with learned absolute position embeddings (GPT-2's ``wpe``) can take;
    None for rotary or other relative schemes, which have no hard limit."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in ("wpe", "position_embeddings"):
            return module.num_embeddings
    return None


def prepare_for_training(cfg: TrainConfig, model: nn.Module) -> nn.Module:
    """The optional speed/memory trade-offs, applied to the model about to be trained.

    Activation checkpointing is transformers' own, per decoder block.
    ``nn.Module.compile`` compiles in place: parameter names, state dicts and
    the in-place merges are unchanged, and a wrapped model is compiled anew.
    """
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"{type(model).__name__} does not support --gradient-checkpointing")
        enable_activation_checkpointing(model)
    if cfg.compile:
        model.compile()
    return model


def model_from_path(path: str | Path) -> nn.Module:
    """A dense model from a Hugging Face directory or a checkpoint of this project."""
    path = Path(path)
    if (path / ckpt.MARKER).is_file():
        return model_from_checkpoint(path)
    return load_pretrained(path)


def model_from_checkpoint(path: Path) -> nn.Module:
    """Rebuild a checkpoint's model and return it dense (adapters merged)."""
    saved = TrainConfig(**ckpt.read_config(path))
    state = ckpt.read_trainer_state(path)
    # init_from is kept for the architecture (a GPT-2 run is no preset LLaMA); the weights come from the checkpoint
    model = make_model(saved, state["vocab_size"])
    if state["wrapped"]:
        wrap(model, saved.relora_config())
    ckpt.load_weights(model, path)
    return unwrap(model) if state["wrapped"] else model


def build_phase(
    cfg: TrainConfig, model: nn.Module, *, wrapped: bool, previous: dict[str, dict] | None = None
) -> _Phase:
    """Optimizer, schedule and controller of the warm-start phase or, ``wrapped``, of the adapter phase.

    At the switch to ReLoRA the optimizer is rebuilt over the new trainable set;
    parameters that stay trainable (embeddings, norms, head) keep their Adam
    state (``previous``: state by parameter name, from ``optimizer_state_by_name``),
    adapters start empty (spec section 6). The schedule continues the same
    envelope: it is not restarted by the switch.
    """
    relora_cfg = cfg.relora_config()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.method in PROJECTION_METHODS:
        from relora.baselines import (
            build_projection_optimizer,  # imports the optional galore/apollo packages
        )

        optimizer = build_projection_optimizer(cfg, model)
    else:
        groups = decay_groups(named, dict(model.named_modules()), cfg.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=cfg.peak_lr(wrapped), betas=(cfg.beta1, cfg.beta2))
    for name, param in named:
        if previous and name in previous:
            optimizer.state[param] = {k: _like_param(v, param) for k, v in previous[name].items()}
    controller = None
    restart_steps: list[int] = []
    restart_warmup = 0
    if relora_cfg is not None:
        controller = ReLoRA(model, optimizer, relora_cfg, start_step=cfg.relora_phase_start, total_steps=cfg.steps)
        if cfg.jagged:  # the warm start's schedule already knows the restarts: one envelope for the run
            restart_steps, restart_warmup = controller.restart_steps(), relora_cfg.restart_warmup_steps
    scheduler = jagged_cosine_scheduler(
        optimizer, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps, restart_steps=restart_steps,
        restart_warmup_steps=restart_warmup, min_ratio=cfg.min_lr_ratio,
        start_step=cfg.relora_phase_start if wrapped else 0,
    )
    return _Phase(optimizer, scheduler, controller if wrapped else None, wrapped)


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, *, whole: bool) -> dict[str, dict]:
    """The optimizer's per-parameter state keyed by parameter name; ``whole`` gathers sharded tensors."""
    by_name = {}
    for name, param in model.named_parameters():
        if param in optimizer.state:
            state = optimizer.state[param]
            by_name[name] = {k: sharding.full(v) if whole and torch.is_tensor(v) else v for k, v in state.items()}
    return by_name


def _like_param(value: object, param: torch.Tensor) -> object:
    """A moment saved whole, laid out like ``param`` (sharded the same way); other state as is."""
    if torch.is_tensor(value) and sharding.is_sharded(param) and value.shape == param.shape:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements,
                                 src_data_rank=None)
    return value


def switch_to_adapters(cfg: TrainConfig, model: nn.Module, phase: _Phase, dist: Dist,
                       vocab_size: int) -> tuple[nn.Module, nn.Module, _Phase]:
    """End of the warm start: wrap the model with adapters and rebuild engine and optimizer.

    DDP registers its parameters when it is built, so it is rebuilt around the
    wrapped model. FSDP2 shards parameters in place, so the warm-started
    weights are gathered, a fresh model is wrapped and sharded, and the Adam
    state of the parameters that stay trainable is re-sharded onto it.
    """
    previous = optimizer_state_by_name(model, phase.optimizer, whole=dist.sharded)
    if dist.sharded:
        weights = dist.full_state_dict(model)
        model = make_model(cfg, vocab_size)
        model.load_state_dict(weights)
    wrap(model, cfg.relora_config())
    model.to(dist.device)
    engine = dist.parallelize(prepare_for_training(cfg, model))
    return model, engine, build_phase(cfg, model, wrapped=True, previous=previous)


def gathered_model(cfg: TrainConfig, model: nn.Module, dist: Dist, *, vocab_size: int,
                   wrapped: bool) -> nn.Module | None:
    """On rank 0 the whole model (under FSDP2 a CPU copy rebuilt from the gathered weights); None elsewhere.

    A collective under FSDP2: every rank must call it.
    """
    if not dist.sharded:
        return model if dist.is_main else None
    weights = dist.full_state_dict(model)
    residuals = merge_residuals(model)
    if not dist.is_main:
        return None
    copy = make_model(cfg, vocab_size)
    if wrapped:
        wrap(copy, cfg.relora_config())
    copy.load_state_dict(weights)
    load_merge_residuals(copy, residuals)  # bf16 frozen weights: the export adds them back
    return copy


def data_order(cfg: TrainConfig, windows: TokenWindows) -> np.ndarray | None:
    """Sequential sampling: one shuffled pass over non-overlapping windows, no repetition."""
    if cfg.sampling == "random":
        return None
    needed = cfg.steps * cfg.sequences_per_step
    if needed > len(windows):
        raise ConfigError(
            f"{cfg.steps} steps need {needed} windows of {cfg.seq_len} tokens but the training data has "
            f"{len(windows)}; use --sampling random, fewer --steps, or more data"
        )
    return np.random.default_rng(cfg.seed).permutation(len(windows))


def check_inputs(cfg: TrainConfig) -> None:
    """Raise the errors a run would meet in its first seconds (device, data) before anything is printed or written."""
    pick_device(cfg.device)
    data = load_prepared(cfg.data)
    _check_data_identity(cfg, data)
    data_order(cfg, TokenWindows(data.train, cfg.seq_len, mode=cfg.sampling, seed=cfg.seed, name="the train split"))
    TokenWindows(data.val, cfg.seq_len, mode="sequential", name="the validation split")


def _check_data_identity(cfg: TrainConfig, data) -> None:
    """A resumed run (its config has a ``data_id``) must find the tokens it started on, wherever they are now."""
    if cfg.data_id is not None and cfg.data_id != data.identity:
        raise ConfigError(f"{cfg.data} holds other tokens than the data this run started on (prepared again?); "
                          "pass the run's data with --data, or start a new --out")


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> RunSummary:
    """Run (or resume) a training run described by ``cfg`` into ``cfg.out``.

    Under torchrun every rank calls this; only rank 0 writes the run directory.
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


class _TooManyBadSteps(Exception):
    def __init__(self, step: int, lr_scale: float) -> None:
        super().__init__(step)
        self.step, self.lr_scale = step, lr_scale


def _train(cfg: TrainConfig, dist: Dist, *, resume: bool, progress: bool, lr_scale: float | None) -> RunSummary:
    """The run itself; ``lr_scale`` (set by a rollback) overrides the LR scale the checkpoint recorded."""
    run_dir, checkpoints = Path(cfg.out), Path(cfg.out) / "checkpoints"
    device, main = dist.device, dist.is_main
    autocast = autocast_for(device)
    relora_cfg = cfg.relora_config()
    micro_steps = cfg.micro_steps(dist.world_size)
    if dist.sharded and cfg.method in PROJECTION_METHODS:
        raise ConfigError(f"--method {cfg.method} needs whole gradients for its projection and does not run "
                          "under FSDP; use --distributed ddp")
    data = load_prepared(cfg.data)
    if resume:
        _check_data_identity(cfg, data)
    # stored resolved and with its identity: a resume from another directory or by another path finds it
    cfg = replace(cfg, data=str(data.path.resolve()), data_id=data.identity)
    train_windows = TokenWindows(data.train, cfg.seq_len, mode=cfg.sampling, seed=cfg.seed, name="the train split")
    val_windows = TokenWindows(data.val, cfg.seq_len, mode="sequential", name="the validation split")
    test_windows = None if data.test is None else TokenWindows(data.test, cfg.seq_len, mode="sequential",
                                                               name="the test split")
    order = data_order(cfg, train_windows)

    reset_peak_memory(device)
    model = make_model(cfg, data.vocab_size)
    if device.type == "cpu" or cfg.threads > 0:  # after the data and model checks: a user error is all that prints
        apply_threads(cfg.threads)
    ckpt.seed_rng_states(cfg.seed, dist.rank)  # dropout repeats with the seed; a resume restores the saved states
    state = {"step": 0, "tokens": 0, "wall_s": 0.0, "train_s": 0.0, "skipped_steps": 0, "wrapped": False,
             "peak_optimizer_state_bytes": 0, "vocab_size": data.vocab_size, "world_size": dist.world_size}
    restored = dist.broadcast_object(ckpt.latest_checkpoint(checkpoints, verify=True) if resume else None)
    if restored is not None:
        state = {**ckpt.read_trainer_state(restored), "world_size": dist.world_size}
        if state["wrapped"]:
            wrap(model, relora_cfg)
        if not ckpt.is_sharded(restored):
            ckpt.load_weights(model, restored)
    model.to(device).train()
    engine = dist.parallelize(prepare_for_training(cfg, model))  # what forward/backward run on; ``model`` is what the math works on
    phase = build_phase(cfg, model, wrapped=state["wrapped"])
    if restored is not None:
        saved = ckpt.load_states(restored)
        if ckpt.is_sharded(restored):
            ckpt.load_sharded(restored, model, phase.optimizer)
        else:
            phase.optimizer.load_state_dict(saved["optimizer"])
        phase.scheduler.load_state_dict(saved["scheduler"])
        if phase.controller is not None:
            phase.controller.load_state_dict(saved["controller"])
        ckpt.restore_rng_states(saved["rng"], rank=dist.rank, world_size=dist.world_size,
                                device=device if dist.active else None)
        target_scale = lr_scale if lr_scale is not None else state.get("lr_scale", 1.0)
        _rescale(phase, target_scale / state.get("lr_scale", 1.0))
        state["lr_scale"] = target_scale
        logger.info("resumed from %s (step %d)", restored, state["step"])
    elif resume:
        logger.warning("no complete checkpoint in %s: starting from step 0", checkpoints)
    metrics_path = run_dir / "metrics.jsonl"
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", _yaml(cfg.to_dict()))
        _truncate_metrics(metrics_path, state["step"])

    from torch.utils.tensorboard import SummaryWriter  # slow import, only when training

    writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=state["step"] or None) if main else None
    tracker = start_wandb(cfg) if main else None  # None unless cfg.wandb
    tokens_per_step = cfg.sequences_per_step * cfg.seq_len
    rank_sequences = cfg.sequences_per_step // dist.world_size
    eval_windows = max(1, cfg.eval_tokens // cfg.seq_len)
    # the logging window and the bad-step streak are part of the checkpoint: after a resume the next record
    # averages the same steps as in the uninterrupted run, and a streak of non-finite steps goes on counting
    window_loss, window_steps = state.get("window_loss", 0.0), state.get("window_steps", 0)
    timed_steps, window_start = 0, time.perf_counter()  # throughput: only the steps timed in this process
    run_start = time.perf_counter() - state["wall_s"]
    summary_notes: list[str] = []
    spikes = _SpikeWatch(relora_cfg.restart_warmup_steps if relora_cfg else 0)
    if "spike_watch" in state:  # absent in checkpoints written before it was saved
        spikes.load_state_dict(state["spike_watch"])

    def save() -> Path:
        state["wall_s"] = time.perf_counter() - run_start
        state.update(window_loss=window_loss, window_steps=window_steps, bad_streak=bad_streak,
                     spike_watch=spikes.state_dict())
        states = {"scheduler": phase.scheduler.state_dict()}
        if not dist.sharded:
            states["optimizer"] = phase.optimizer.state_dict()
        if phase.controller is not None:
            states["controller"] = phase.controller.state_dict()
        return ckpt.save_checkpoint(checkpoints, state["step"], model=model, states=states,
                                    trainer_state=state, config=cfg.to_dict(), keep=cfg.keep_checkpoints,
                                    dist=dist if dist.active else None, optimizer=phase.optimizer)

    def save_reference() -> None:
        dense = gathered_model(cfg, model, dist, vocab_size=data.vocab_size, wrapped=phase.wrapped)
        if dense is not None:
            save_dense(dense, None, run_dir / "reference")
        dist.barrier()

    bad_streak = state.get("bad_streak", 0)
    bar = _progress_bar(cfg.steps, state["step"], progress and main)
    metrics = open(metrics_path, "a") if main else contextlib.nullcontext()
    with _StopOnSignal() as stop, metrics:
        while state["step"] < cfg.steps:
            step = state["step"]
            if step == reference_step(cfg):
                save_reference()
            if relora_cfg is not None and step == cfg.relora_phase_start and not phase.wrapped:
                del engine  # DDP's hooks on the old parameter set go with it
                model, engine, phase = switch_to_adapters(cfg, model, phase, dist, data.vocab_size)
                _rescale(phase, state.get("lr_scale", 1.0))
                state["wrapped"] = True
                logger.info("step %d: switched to %s (%s)", step, cfg.method, _param_counts(model))

            lr = phase.optimizer.param_groups[0]["lr"]
            step_start = time.perf_counter()
            loss_sum = 0.0
            for micro in range(micro_steps):
                # this rank's slice of the step's global batch: the same sequences whatever the world size
                first = step * cfg.sequences_per_step + dist.rank * rank_sequences + micro * cfg.micro_batch
                ids = np.arange(first, first + cfg.micro_batch)
                batch = train_windows.get(order[ids] if order is not None else ids).to(device)
                with dist.gradient_sync(engine, enabled=micro == micro_steps - 1):
                    with autocast:
                        loss = lm_loss(engine, batch)
                    (loss / micro_steps).backward()
                loss_sum += loss.item()
            trainable = [p for p in model.parameters() if p.requires_grad]
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf  # 0: no clipping (GaLore's, APOLLO's scripts)
            grad_norm = float(sharding.full(torch.nn.utils.clip_grad_norm_(trainable, max_norm)))
            # one collective per step: the global mean loss, and whether any rank was asked to stop
            loss_total, stops = dist.all_reduce([loss_sum, float(stop.requested)])
            step_loss = loss_total / (micro_steps * dist.world_size)
            stop_now = stops > 0
            if math.isfinite(grad_norm) and math.isfinite(step_loss):
                phase.optimizer.step()
                if phase.wrapped and cfg.weight_decay:  # W + s B A decays as a full-rank weight (optim.decay_groups)
                    decay_frozen_(model, 1.0 - lr * cfg.weight_decay)
                bad_streak = 0
            else:  # a non-finite loss or gradient: skip the update, keep the run alive
                state["skipped_steps"] += 1
                bad_streak += 1
                logger.warning("step %d: non-finite loss or gradient norm, update skipped (%d in a row)",
                               step, bad_streak)
                if bad_streak > cfg.max_bad_steps:
                    raise _TooManyBadSteps(step, state.get("lr_scale", 1.0))
            phase.optimizer.zero_grad(set_to_none=True)
            phase.scheduler.step()
            state["step"] = step = step + 1
            state["tokens"] += tokens_per_step
            event = phase.controller.step(step) if phase.controller is not None else None
            state["train_s"] = state.get("train_s", 0.0) + time.perf_counter() - step_start
            state_bytes = optimizer_state_bytes(phase.optimizer)  # after the step: the state exists from step 1
            state["peak_optimizer_state_bytes"] = max(state.get("peak_optimizer_state_bytes", 0), state_bytes)

            spikes.observe(step, step_loss, event, phase.controller)
            window_loss += step_loss
            window_steps += 1
            timed_steps += 1
            bar.update(1)
            record = None
            if step % cfg.log_every == 0 or step == cfg.steps or (event is not None and event.merged):
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": step, "tokens": state["tokens"], "loss": window_loss / window_steps, "lr": lr,
                    "grad_norm": grad_norm, "tokens_per_s": timed_steps * tokens_per_step / elapsed,
                    "peak_mem_bytes": int(dist.all_reduce([peak_memory_bytes(device)], op="max")[0]),
                    "optimizer_state_bytes": state_bytes,
                    "restarts": phase.controller.restarts if phase.controller else 0,
                    "merges": phase.controller.merges if phase.controller else 0,
                    "pruned_fraction": phase.controller.last_pruned_fraction if phase.controller else None,
                    "restart": bool(event and event.restarted),
                    "wrapped": phase.wrapped,
                }
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                window_loss, window_steps, timed_steps, window_start = 0.0, 0, 0, time.perf_counter()
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                val_loss = evaluate(model, val_windows, num_windows=eval_windows, micro_batch=cfg.micro_batch,
                                    device=device, autocast=autocast, rank=dist.rank, world_size=dist.world_size,
                                    reduce=dist.all_reduce)
                record = record or {"step": step, "tokens": state["tokens"]}
                record.update(val_loss=val_loss, val_ppl=perplexity(val_loss))
                if main:  # the CLI's handler writes it above the progress bar
                    logger.info("step %d: val loss %.4f, val ppl %.2f", step, val_loss, record["val_ppl"])
                state["val_loss"] = val_loss
                timed_steps, window_start = 0, time.perf_counter()  # evaluation time is not training throughput
            if record is not None and main:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                for key, value in record.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                        writer.add_scalar(key, value, step)
                log_wandb(tracker, record)
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or stop_now:
                save()
            if stop_now:
                summary_notes.append(f"interrupted at step {step}; continue with --resume")
                break
    bar.close()
    if writer is not None:
        writer.close()
    finish_wandb(tracker)

    interrupted = state["step"] < cfg.steps
    trainable, total = count_parameters(model)  # before export, which removes the adapters
    test_loss = None
    if not interrupted and test_windows is not None:  # held out from tuning: read once, after the last step
        test_loss = evaluate(model, test_windows, num_windows=eval_windows, micro_batch=cfg.micro_batch,
                             device=device, autocast=autocast, rank=dist.rank, world_size=dist.world_size,
                             reduce=dist.all_reduce)
    if not interrupted:
        dense = gathered_model(cfg, model, dist, vocab_size=data.vocab_size, wrapped=phase.wrapped)
        if dense is not None:
            export_dense(dense, data.tokenizer(), run_dir / "final")
    summary = RunSummary(
        run_dir=run_dir, method=cfg.method, steps=state["step"], tokens=state["tokens"],
        wall_s=time.perf_counter() - run_start, trainable_params=trainable, total_params=total,
        restarts=phase.controller.restarts if phase.controller else 0,
        merges=phase.controller.merges if phase.controller else 0,
        peak_mem_bytes=int(dist.all_reduce([peak_memory_bytes(device)], op="max")[0]),
        optimizer_state_bytes=optimizer_state_bytes(phase.optimizer),
        peak_optimizer_state_bytes=state.get("peak_optimizer_state_bytes", 0),
        tokens_per_s=state["tokens"] / state["train_s"] if state.get("train_s") else None,
        val_loss=state.get("val_loss"),
        val_ppl=perplexity(state["val_loss"]) if "val_loss" in state else None,
        test_loss=test_loss, test_ppl=perplexity(test_loss) if test_loss is not None else None,
        skipped_steps=state["skipped_steps"], interrupted=interrupted, notes=summary_notes,
    )
    if not interrupted and main:  # written last: its presence means the run finished (relora compare relies on it)
        write_json_atomic(run_dir / "summary.json", summary.to_dict())
    dist.barrier()
    return summary


def _rescale(phase: _Phase, factor: float) -> None:
    """Multiply the phase's LR (and its schedule's peak) by ``factor``: how a rollback lowers the LR."""
    if factor == 1.0:
        return
    phase.scheduler.base_lrs = [lr * factor for lr in phase.scheduler.base_lrs]
    for group in phase.optimizer.param_groups:
        group["lr"] *= factor


class _SpikeWatch:
    """Warn when the loss right after a restart jumps above its level before the restart.

    Heuristic, logging only: a spike here is 3 consecutive steps within the
    re-warmup (plus 10 steps) whose loss exceeds the mean of the 10 steps
    before the restart by more than 10% + 0.1 nats. One noisy step is not a
    spike: at small batches single-step losses swing that much on their own
    (seen in docs/results/baselines). Users tune ``--restart-warmup-steps`` with it.
    """

    RUN = 3

    def __init__(self, restart_warmup_steps: int) -> None:
        self.window = restart_warmup_steps + 10
        self.recent: list[float] = []
        self.baseline: float | None = None
        self.until = -1
        self.restart = 0
        self.above: list[float] = []

    def observe(self, step: int, loss: float, event: object, controller: ReLoRA | None) -> None:
        if event is not None and event.restarted and self.recent:
            self.baseline = sum(self.recent) / len(self.recent)
            self.until, self.restart, self.above = step + self.window, controller.restarts, []
        elif self.baseline is not None and step <= self.until:
            self.above = self.above + [loss] if loss > 1.1 * self.baseline + 0.1 else []
            if len(self.above) == self.RUN:
                logger.warning("loss spike after restart %d: %.3f on average over steps %d-%d against %.3f before "
                               "it; a longer --restart-warmup-steps may help", self.restart,
                               sum(self.above) / self.RUN, step - self.RUN + 1, step, self.baseline)
                self.baseline = None  # once per restart
        self.recent = (self.recent + [loss])[-10:]

    def state_dict(self) -> dict:
        """JSON-able: checkpointed with the trainer state, so a resumed run warns where the uninterrupted one would."""
        return {"recent": list(self.recent), "baseline": self.baseline, "until": self.until,
                "restart": self.restart, "above": list(self.above)}

    def load_state_dict(self, state: dict) -> None:
        self.recent, self.above = list(state["recent"]), list(state["above"])
        self.baseline, self.until, self.restart = state["baseline"], state["until"], state["restart"]


def reference_step(cfg: TrainConfig) -> int | None:
    """Step whose weights ``relora analyze`` measures the update against by default.

    Where low-rank training starts: the end of the warm start, or step 0
    without one. Methods that train every weight (full, control, GaLore,
    APOLLO) use the step at which the adapter methods of the same config
    switch, so that dW spans the same steps in every run (for full-rank
    training with equal seeds the warm starts are even identical).
    """
    if cfg.method not in ADAPTER_METHODS:
        step = cfg.warm_start_steps if cfg.warm_start else 0
    else:
        step = cfg.relora_phase_start
    return step if step < cfg.steps else None


def save_dense(model: nn.Module, tokenizer: object | None, out: Path) -> Path:
    """Save an unwrapped model (+ tokenizer) as a Hugging Face directory, atomically.

    An existing `out` is replaced only if relora wrote it (ownership.py): never a directory of the user's.
    """
    reason = ownership.why_not_replaceable(out, ownership.MODEL)
    if reason is not None:
        raise ConfigError(f"{out} cannot be replaced: {reason}; relora never deletes it, choose another directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        ownership.mark(tmp, ownership.MODEL)
        ckpt.apply_umask_modes(tmp)
        swap_dir(tmp, out)  # the old copy goes only once the new one is in: never neither
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_dense(model: nn.Module, tokenizer: object | None, out: Path) -> Path:
    """Merge the last cycle, drop the adapters, save a plain HF model (+ tokenizer) atomically.

    Merging first avoids the reference code's defect of saving the final model
    without its last cycle (spec section 3).
    """
    return save_dense(unwrap(model).cpu(), tokenizer, out)


def _param_counts(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"{trainable:,} trainable of {total:,} parameters"


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint (the run repeats those steps)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a crash mid-write
            continue
        if record["step"] <= step:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def _yaml(values: dict) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
