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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from relora import checkpoint as ckpt
from relora.adapters import unwrap, wrap
from relora.controller import ReLoRA
from relora.data import TokenWindows, load_prepared
from relora.evaluation import evaluate, lm_loss, perplexity
from relora.models import ConfigError, build_model, control_model_config, count_parameters, llama_config, load_pretrained
from relora.run_config import TrainConfig
from relora.schedule import jagged_cosine_scheduler
from relora.tracking import finish_wandb, log_wandb, start_wandb

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
    val_loss: float | None = None
    val_ppl: float | None = None
    skipped_steps: int = 0
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["run_dir"] = str(self.run_dir)
        return values


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
        return model
    arch = cfg.model
    if cfg.method == "control":
        arch = control_model_config(cfg.model, vocab_size, cfg.rank)
    return build_model(llama_config(arch, vocab_size, cfg.seq_len), cfg.seed)


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
    cfg: TrainConfig, model: nn.Module, *, wrapped: bool, previous: torch.optim.Optimizer | None = None
) -> _Phase:
    """Optimizer, schedule and controller of the warm-start phase or, ``wrapped``, of the adapter phase.

    At the switch to ReLoRA the optimizer is rebuilt over the new trainable set;
    parameters that stay trainable (embeddings, norms, head) keep their Adam
    state, adapters start empty (spec section 6). The schedule continues the
    same envelope: it is not restarted by the switch.
    """
    relora_cfg = cfg.relora_config()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.peak_lr(wrapped), betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay)
    if previous is not None:
        for p in params:
            if p in previous.state:
                optimizer.state[p] = previous.state[p]
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


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> RunSummary:
    """Run (or resume) a training run described by ``cfg`` into ``cfg.out``."""
    run_dir, checkpoints = Path(cfg.out), Path(cfg.out) / "checkpoints"
    device = pick_device(cfg.device)
    autocast = autocast_for(device)
    relora_cfg = cfg.relora_config()
    data = load_prepared(cfg.data)
    train_windows = TokenWindows(data.train, cfg.seq_len, mode=cfg.sampling, seed=cfg.seed, name="the train split")
    val_windows = TokenWindows(data.val, cfg.seq_len, mode="sequential", name="the validation split")
    order = data_order(cfg, train_windows)

    model = make_model(cfg, data.vocab_size)
    state = {"step": 0, "tokens": 0, "wall_s": 0.0, "skipped_steps": 0, "wrapped": False,
             "vocab_size": data.vocab_size}
    restored = ckpt.latest_checkpoint(checkpoints) if resume else None
    if restored is not None:
        state = ckpt.read_trainer_state(restored)
        if state["wrapped"]:
            wrap(model, relora_cfg)
        ckpt.load_weights(model, restored)
    model.to(device).train()
    phase = build_phase(cfg, model, wrapped=state["wrapped"])
    if restored is not None:
        saved = ckpt.load_states(restored)
        phase.optimizer.load_state_dict(saved["optimizer"])
        phase.scheduler.load_state_dict(saved["scheduler"])
        if phase.controller is not None:
            phase.controller.load_state_dict(saved["controller"])
        ckpt.set_rng_state(saved["rng"])
        logger.info("resumed from %s (step %d)", restored, state["step"])
    elif resume:
        logger.warning("no complete checkpoint in %s: starting from step 0", checkpoints)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(_yaml(cfg.to_dict()))
    metrics_path = run_dir / "metrics.jsonl"
    _truncate_metrics(metrics_path, state["step"])

    from torch.utils.tensorboard import SummaryWriter  # slow import, only when training

    writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=state["step"] or None)
    tracker = start_wandb(cfg)  # None unless cfg.wandb
    tokens_per_step = cfg.sequences_per_step * cfg.seq_len
    eval_windows = max(1, cfg.eval_tokens // cfg.seq_len)
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    run_start = time.perf_counter() - state["wall_s"]
    summary_notes: list[str] = []

    def save() -> Path:
        state["wall_s"] = time.perf_counter() - run_start
        states = {"optimizer": phase.optimizer.state_dict(), "scheduler": phase.scheduler.state_dict()}
        if phase.controller is not None:
            states["controller"] = phase.controller.state_dict()
        return ckpt.save_checkpoint(checkpoints, state["step"], model=model, states=states,
                                    trainer_state=state, config=cfg.to_dict(), keep=cfg.keep_checkpoints)

    bar = _progress_bar(cfg.steps, state["step"], progress)
    with _StopOnSignal() as stop, open(metrics_path, "a") as metrics:
        while state["step"] < cfg.steps:
            step = state["step"]
            if step == reference_step(cfg):
                save_dense(model, None, run_dir / "reference")
            if relora_cfg is not None and step == cfg.relora_phase_start and not phase.wrapped:
                wrap(model, relora_cfg)
                model.to(device)
                phase = build_phase(cfg, model, wrapped=True, previous=phase.optimizer)
                state["wrapped"] = True
                logger.info("step %d: switched to %s (%s)", step, cfg.method, _param_counts(model))

            lr = phase.optimizer.param_groups[0]["lr"]
            loss_sum = 0.0
            for micro in range(cfg.grad_accumulation):
                first = step * cfg.sequences_per_step + micro * cfg.micro_batch
                ids = np.arange(first, first + cfg.micro_batch)
                batch = train_windows.get(order[ids] if order is not None else ids).to(device)
                with autocast:
                    loss = lm_loss(model, batch)
                (loss / cfg.grad_accumulation).backward()
                loss_sum += loss.item()
            trainable = [p for p in model.parameters() if p.requires_grad]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip))
            if math.isfinite(grad_norm) and math.isfinite(loss_sum):
                phase.optimizer.step()
            else:  # a non-finite loss or gradient: skip the update, keep the run alive
                state["skipped_steps"] += 1
                logger.warning("step %d: non-finite loss or gradient norm, update skipped", step)
            phase.optimizer.zero_grad(set_to_none=True)
            phase.scheduler.step()
            state["step"] = step = step + 1
            state["tokens"] += tokens_per_step
            event = phase.controller.step(step) if phase.controller is not None else None

            window_loss += loss_sum / cfg.grad_accumulation
            window_steps += 1
            bar.update(1)
            record = None
            if step % cfg.log_every == 0 or step == cfg.steps or (event is not None and event.merged):
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": step, "tokens": state["tokens"], "loss": window_loss / window_steps, "lr": lr,
                    "grad_norm": grad_norm, "tokens_per_s": window_steps * tokens_per_step / elapsed,
                    "peak_mem_bytes": peak_memory_bytes(device),
                    "restarts": phase.controller.restarts if phase.controller else 0,
                    "merges": phase.controller.merges if phase.controller else 0,
                    "pruned_fraction": phase.controller.last_pruned_fraction if phase.controller else None,
                    "restart": bool(event and event.restarted),
                    "wrapped": phase.wrapped,
                }
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                val_loss = evaluate(model, val_windows, num_windows=eval_windows, micro_batch=cfg.micro_batch,
                                    device=device, autocast=autocast)
                record = record or {"step": step, "tokens": state["tokens"]}
                record.update(val_loss=val_loss, val_ppl=perplexity(val_loss))
                state["val_loss"] = val_loss
                window_start = time.perf_counter()  # evaluation time is not training throughput
            if record is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                for key, value in record.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                        writer.add_scalar(key, value, step)
                log_wandb(tracker, record)
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or stop.requested:
                save()
            if stop.requested:
                summary_notes.append(f"interrupted at step {step}; continue with --resume")
                break
    bar.close()
    writer.close()
    finish_wandb(tracker)

    interrupted = state["step"] < cfg.steps
    trainable, total = count_parameters(model)  # before export, which removes the adapters
    if not interrupted:
        export_dense(model, data.tokenizer(), run_dir / "final")
    summary = RunSummary(
        run_dir=run_dir, method=cfg.method, steps=state["step"], tokens=state["tokens"],
        wall_s=time.perf_counter() - run_start, trainable_params=trainable, total_params=total,
        restarts=phase.controller.restarts if phase.controller else 0,
        merges=phase.controller.merges if phase.controller else 0,
        peak_mem_bytes=peak_memory_bytes(device), val_loss=state.get("val_loss"),
        val_ppl=perplexity(state["val_loss"]) if "val_loss" in state else None,
        skipped_steps=state["skipped_steps"], interrupted=interrupted, notes=summary_notes,
    )
    if not interrupted:  # written last: its presence means the run finished (relora compare relies on it)
        ckpt.write_json_atomic(run_dir / "summary.json", summary.to_dict())
    return summary


def reference_step(cfg: TrainConfig) -> int | None:
    """Step whose weights ``relora analyze`` measures the update against by default.

    Where low-rank training starts: the end of the warm start, or step 0
    without one. Full-rank runs use the step at which the adapter methods of
    the same config switch, so that every method's dW starts from the same
    weights (with equal seeds the warm starts are identical).
    """
    if cfg.method in ("full", "control"):
        step = cfg.warm_start_steps if cfg.warm_start else 0
    else:
        step = cfg.relora_phase_start
    return step if step < cfg.steps else None


def save_dense(model: nn.Module, tokenizer: object | None, out: Path) -> Path:
    """Save an unwrapped model (+ tokenizer) as a Hugging Face directory, atomically."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
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
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _yaml(values: dict) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
