"""Where a training run's records go: config.yaml, metrics.jsonl, TensorBoard, W&B and the progress bar.

Only rank 0 writes; on the other ranks every method is a no-op but the clock.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from relora.fileio import write_text_atomic
from relora.run.config import TrainConfig
from relora.run.tracking import finish_wandb, log_wandb, start_wandb


class Logbook:
    """The run directory's records from ``step`` on (a resume drops the records after its checkpoint), and
    the throughput clock: only the steps timed in this process, evaluation and checkpointing excluded.

    A context manager for metrics.jsonl; ``close`` ends the others after the last step.
    """

    def __init__(self, cfg: TrainConfig, *, step: int, main: bool, progress: bool) -> None:
        run_dir, self.main = Path(cfg.out), main
        metrics_path = run_dir / "metrics.jsonl"
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_dir / "config.yaml", _yaml(cfg.to_dict()))
            _truncate_metrics(metrics_path, step)

        from torch.utils.tensorboard import (
            SummaryWriter,  # slow import, only when training
        )

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step or None) if main else None
        self.tracker = start_wandb(cfg) if main else None  # None unless cfg.wandb
        self.restart_clock()
        self.bar = _progress_bar(cfg.steps, step, progress and main)
        self.metrics = open(metrics_path, "a") if main else None

    def restart_clock(self) -> None:
        self.timed_steps, self.window_start = 0, time.perf_counter()

    def tick(self) -> None:
        """One more step done."""
        self.timed_steps += 1
        self.bar.update(1)

    def tokens_per_s(self, tokens_per_step: int) -> float:
        return self.timed_steps * tokens_per_step / (time.perf_counter() - self.window_start)

    def show(self, record: dict) -> None:
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}")

    def write(self, record: dict | None, step: int) -> None:
        """Append the record to metrics.jsonl, its numbers to TensorBoard and W&B."""
        if record is None or not self.main:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self.writer.add_scalar(key, value, step)
        log_wandb(self.tracker, record)

    def __enter__(self) -> Logbook:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.metrics is not None:
            self.metrics.close()

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
        finish_wandb(self.tracker)


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
