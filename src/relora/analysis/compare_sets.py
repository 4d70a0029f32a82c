"""The runs ``relora compare`` can make: the sets of methods and ablation rows, and the config of each run.

Every run of a set is one ``relora train`` with the same preset, data, token
budget, schedule and seed, differing only in its method or one ablation
switch. The ``baselines`` set puts both ReLoRA rows that later papers
disagree on (with the warm start, as the paper prescribes, and without it, as
GaLore's Table 2 measured it) next to full-rank training, LoRA and the
published GaLore and APOLLO optimizers. A run lives in
``RUNS/NAME-lrLR-seedSEED/``: the name is how a later comparison finds and
reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relora.run.config import (
    ADAPTER_METHODS,
    FULL_RANK_METHODS,
    PROJECTION_METHODS,
    TWO_PHASE_LR_METHODS,
    TrainConfig,
    unread_settings,
)
from relora.run.resolve import resolve_config

ABLATION_SWITCHES = ("restarts", "optimizer_reset", "jagged", "warm_start")


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison: a directory name and the settings that make it that method."""

    name: str
    settings: dict[str, Any]
    paper: str | None = None  # the row of the paper's Table 6 this run reproduces


def ablation_switches(config: TrainConfig) -> dict[str, bool]:
    """Table 6's columns: which ReLoRA components a run of ``config`` actually has; {} if full-rank.

    Read from what the trainer does, not from the switches as given: restarts
    are merges and re-inits of the adapters; an optimizer reset is a prune of
    their moments at those merges; a jagged schedule puts the LR at 0 there
    and re-warms it; a warm start is full-rank training before the adapters.
    ``--no-restarts`` thus runs (and is labelled) with no reset and no jagged
    schedule either: there is nothing for them to act at.
    """
    relora_cfg = config.relora_config()
    if relora_cfg is None:
        return {}
    restarts = relora_cfg.merge_every is not None
    return {
        "restarts": restarts,
        "optimizer_reset": restarts and relora_cfg.prune != "none" and relora_cfg.prune_ratio > 0,
        "jagged": restarts and config.jagged and relora_cfg.restart_warmup_steps > 0,
        "warm_start": config.relora_phase_start > 0,
    }


MAIN_SET = [
    RunSpec("full", {"method": "full"}),
    RunSpec("full-ws-lr", {"method": "full-ws-lr"}),  # not a paper row: full-rank with lora-ws's two-phase LR
    RunSpec("control", {"method": "control"}),
    RunSpec("lora", {"method": "lora"}),
    RunSpec("lora-ws", {"method": "lora-ws"}),
    RunSpec("relora", {"method": "relora"}),
]
_NO_WARM_START = {"method": "relora", "warm_start": False}
# The rows of the paper's Table 6 (130M), each adding components to LoRA from scratch; the paper's perplexity
# beside them in RELORA_SPEC.md section 8 (docs/method.md quotes the table).
ABLATION_SET = [
    RunSpec("lora", {"method": "lora"}, "LoRA"),
    RunSpec("lora-restarts", {**_NO_WARM_START, "optimizer_reset": False, "jagged": False}, "+ restarts"),
    RunSpec("lora-restarts-reset", {**_NO_WARM_START, "jagged": False}, "+ restarts + optimizer reset"),
    RunSpec("lora-restarts-jagged", {**_NO_WARM_START, "optimizer_reset": False}, "+ restarts + jagged schedule"),
    RunSpec("relora-no-warm-start", dict(_NO_WARM_START), "restarts + reset + jagged, no warm start"),
    RunSpec("lora-ws", {"method": "lora-ws"}, "warm start only"),
    RunSpec("relora", {"method": "relora"}, "all four (ReLoRA)"),
    RunSpec("full", {"method": "full"}, "full-rank training"),
]
BASELINES_SET = [
    RunSpec("full", {"method": "full"}),
    RunSpec("full-ws-lr", {"method": "full-ws-lr"}),  # the warm-started rows' schedule at full rank
    # GaLore's two LRs at full rank: AdamW with the matrices at a quarter (GaLore's scale) of the rest's LR
    RunSpec("full-split-lr", {"method": "full", "matrix_lr_scale": 0.25}),
    RunSpec("lora-ws", {"method": "lora-ws"}),
    RunSpec("relora", {"method": "relora"}),
    RunSpec("relora-no-warm-start", {"method": "relora", "warm_start": False}),  # GaLore Table 2's ReLoRA
    RunSpec("galore", {"method": "galore"}),
    RunSpec("apollo", {"method": "apollo"}),
    # rank 1 is what makes APOLLO-mini (APOLLO paper): a --proj-rank given to the set is GaLore's and APOLLO's
    RunSpec("apollo-mini", {"method": "apollo-mini", "proj_rank": 1}),
]
SETS = {"main": MAIN_SET, "ablation": ABLATION_SET, "baselines": BASELINES_SET}
TABLE_SETS = ("main", "baselines")  # sets written as the method table (the others as Table 6)
PAPER_SETS = ("main", "ablation")  # what ``--set all`` runs: the ReLoRA paper's tables, no extra packages


# Gradient clipping as each method's authors published it: GaLore's and APOLLO's training scripts do not clip
# (issue 17); ReLoRA's clips at 1.0, the config's default.
PUBLISHED_GRAD_CLIP = {"galore": 0.0, "apollo": 0.0, "apollo-mini": 0.0}
CLIP_RULES = ("published", "same")


def lr_field(method: str) -> str:
    """The config field ``--lr`` sets for a method: the peak LR of its main phase (as ``relora train --lr``).

    Adapter methods: ``relora_lr``, the LR after the warm start (the warm start keeps ``lr``, full-rank
    training's), and so for ``full-ws-lr``, their LR schedule without adapters; GaLore/APOLLO: ``proj_lr``;
    full-rank and control: ``lr``.
    """
    if method in TWO_PHASE_LR_METHODS:
        return "relora_lr"
    return "proj_lr" if method in PROJECTION_METHODS else "lr"


# Settings a set passes to the rows that read them and drops for the others: the study-only reference defects
# are adapters' defects; --matrix-lr-scale is a full-rank diagnostic (the other methods set their matrices' LR).
READ_ONLY_BY = {"reference_defects": ADAPTER_METHODS, "matrix_lr_scale": FULL_RANK_METHODS}


def dropped_settings(specs: list[RunSpec], overrides: dict[str, Any]) -> dict[str, list[str]]:
    """{setting given in ``overrides``: the rows that do not read it (``READ_ONLY_BY``), in ``specs`` order}."""
    dropped = {}
    for key, readers in READ_ONLY_BY.items():
        names = [s.name for s in specs if {**overrides, **s.settings}.get("method") not in readers]
        if key in overrides and names:
            dropped[key] = names
    return dropped


def run_name(spec: RunSpec, lr: float, seed: int) -> str:
    return f"{spec.name}-lr{lr:g}-seed{seed}"


def resolve_run(spec: RunSpec, runs_dir: Path, *, preset: str | None, config_file: str | None,
                overrides: dict[str, Any], lr: float | None = None, seed_index: int = 0,
                clip_rule: str = "published") -> TrainConfig:
    """The config of one run: the set's settings, this spec's method, a grid LR and the k-th seed after --seed."""
    values = {**overrides, **spec.settings}
    for key, readers in READ_ONLY_BY.items():  # a run of another method is the same run without it, and reused
        if values.get("method") not in readers:
            values.pop(key, None)
    pinned = unread_settings(values.get("method"))
    if pinned:  # full-rank training reads no adapter or projection setting (full-ws-lr only relora_lr, the LR of its
        # second phase): the others are pinned to the preset's, so that one run serves every table, the baselines'
        # --rank / --proj-rank included
        plain = resolve_config(preset=preset, overrides={k: v for k, v in values.items() if k not in pinned})
        values.update({k: getattr(plain, k) for k in pinned})
    if clip_rule == "published" and spec.settings["method"] in PUBLISHED_GRAD_CLIP:
        values["grad_clip"] = PUBLISHED_GRAD_CLIP[spec.settings["method"]]
    base = resolve_config(preset=preset, config_file=config_file, overrides=values)
    field = lr_field(base.method)
    lr = getattr(base, field) if lr is None else lr
    seed = base.seed + seed_index
    values.update({field: lr, "seed": seed, "out": str(runs_dir / run_name(spec, lr, seed))})
    return resolve_config(preset=preset, config_file=config_file, overrides=values)
