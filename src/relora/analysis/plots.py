"""Figures: loss curves (the paper's Figure 1) and update spectra (Figures 3 and 4).

matplotlib with the non-interactive Agg backend, fixed figure sizes (so a
figure's pixel size is known: ``size_px``), PNGs written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from relora.analysis.spectra import DEFAULT_THRESHOLD, UpdateSpectra
from relora.fileio import write_atomic
from relora.run.records import Curves

DPI = 100
CURVES_SIZE = (12.0, 4.5)  # inches: 1200 x 450 px
SPECTRA_PANEL = (3.0, 2.8)  # inches per matrix-type panel
BELOW_SIZE = (8.0, 4.0)  # 800 x 400 px


def size_px(size: tuple[float, float]) -> tuple[int, int]:
    """Pixel (width, height) of a figure of ``size`` inches saved by this module."""
    return round(size[0] * DPI), round(size[1] * DPI)


def spectra_size(num_types: int) -> tuple[float, float]:
    """Figure size of ``plot_spectra``: up to four panels per row."""
    cols = min(4, max(1, num_types))
    rows = -(-max(1, num_types) // cols)
    return SPECTRA_PANEL[0] * cols, SPECTRA_PANEL[1] * rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def run_colors(n: int) -> list:
    """One distinct color per run: matplotlib's default cycle up to its 10, then tab20, then a sampled colormap.

    The default cycle repeats after 10, so a comparison of more runs (a study's 13 seed-0 runs) would draw two
    runs alike and make the legend ambiguous; the first 10 stay the default colors, so small figures are unchanged.
    """
    plt = _pyplot()
    default = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if n <= len(default):
        return list(default[:n])
    if n <= 20:
        return list(plt.get_cmap("tab20").colors[:n])
    return [plt.get_cmap("turbo")(i / (n - 1)) for i in range(n)]


def _save(fig, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))
    return out


def plot_curves(runs: list[Curves], out: Path, *, title: str | None = None) -> Path:
    """Training loss and validation perplexity of several runs against step; restarts dotted."""
    plt = _pyplot()
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=CURVES_SIZE, layout="constrained")
    for run, color in zip(runs, run_colors(len(runs)), strict=True):
        ax_loss.plot(run.steps, run.loss, color=color, label=run.label, linewidth=1.2)
        if run.val_steps:
            ax_ppl.plot(run.val_steps, run.val_ppl, color=color, marker="o", markersize=3, label=run.label)
        for step in run.restarts:
            ax_loss.axvline(step, color=color, linestyle=":", linewidth=0.8, alpha=0.7)
        if run.switch is not None:
            ax_loss.axvline(run.switch, color=color, linestyle="--", linewidth=0.8, alpha=0.5)
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss (dotted: restarts, dashed: end of warm start)")
    ax_ppl.set(xlabel="step", ylabel="validation perplexity", yscale="log", title="validation perplexity")
    if runs and len(runs[0].loss) > 1:  # the first steps' loss (~ln vocab) would flatten the rest
        tail = np.concatenate([np.asarray(r.loss[len(r.loss) // 10:]) for r in runs])
        tail = tail[np.isfinite(tail)]  # a run that diverged logged non-finite losses
        heads = [r.loss[0] for r in runs if math.isfinite(r.loss[0])]
    if runs and len(runs[0].loss) > 1 and len(tail) and heads:
        head = max(heads)
        ax_loss.set_ylim(tail.min() - 0.1, min(head, tail.max() + 0.5 * (tail.max() - tail.min()) + 0.1))
    _label_log_axis(ax_ppl)
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    try:
        return _save(fig, out)
    finally:
        plt.close(fig)


# Tick multiples per decade for a log axis, coarse to fine: the first that labels >= 4 values in the range is used.
LOG_TICK_SUBS = ((1.0,), (1.0, 3.0), (1.0, 2.0, 5.0), (1.0, 1.5, 2.0, 3.0, 5.0, 7.0),
                 (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0))


def _label_log_axis(ax) -> None:
    """Plain-number labels, at least four, on a log y axis (after its data is plotted).

    matplotlib labels a log axis at powers of ten, which leaves one or two labels on a perplexity range such as
    40-400; this takes the coarsest of LOG_TICK_SUBS that gives four, or linear steps on a very narrow range.
    """
    from matplotlib.ticker import (
        FixedLocator,
        FuncFormatter,
        LogLocator,
        MaxNLocator,
        NullFormatter,
    )

    low, high = ax.get_ylim()
    if not 0 < low < high:
        return
    for subs in LOG_TICK_SUBS:
        ticks = [t for t in LogLocator(subs=subs, numticks=100).tick_values(low, high) if low <= t <= high]
        if len(ticks) >= 4:
            break
    else:  # less than about a third of a decade: a log axis is nearly linear there
        ticks = [t for t in MaxNLocator(nbins=6).tick_values(low, high) if t > 0]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(low, high)


def plot_spectra(spectra: Mapping[str, UpdateSpectra], out: Path, *, title: str | None = None) -> Path:
    """Per matrix type, the distribution of dW's singular values for each run (Figure 3)."""
    plt = _pyplot()
    types = list(dict.fromkeys(t for s in spectra.values() for t in s.values))
    size = spectra_size(len(types))
    cols = min(4, max(1, len(types)))
    rows = -(-max(1, len(types)) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=size, layout="constrained", squeeze=False)
    top = max((float(np.max(v)) for s in spectra.values() for vs in s.values.values() for v in vs), default=1.0)
    bins = np.linspace(0.0, top * 1.001 or 1.0, 41)
    colors = dict(zip(spectra, run_colors(len(spectra)), strict=True))
    for ax, kind in zip(axes.flat, types, strict=False):
        for label, s in spectra.items():
            if kind in s.values:
                pooled = np.concatenate(s.values[kind])
                ax.hist(pooled, bins=bins, histtype="step", linewidth=1.3, label=label, color=colors[label])
        ax.set(title=kind, xlabel="singular value of dW", ylabel="count", yscale="log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(types):]:
        ax.axis("off")
    if types:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle(title or "singular values of dW = W - W_reference")
    try:
        return _save(fig, out)
    finally:
        plt.close(fig)


def plot_below_threshold(
    spectra: Mapping[str, UpdateSpectra], out: Path, *, threshold: float = DEFAULT_THRESHOLD
) -> Path:
    """Per matrix type and run, the mean count of singular values below ``threshold`` (Figure 4)."""
    plt = _pyplot()
    types = list(dict.fromkeys(t for s in spectra.values() for t in s.values))
    fig, ax = plt.subplots(figsize=BELOW_SIZE, layout="constrained")
    width = 0.8 / max(1, len(spectra))
    x = np.arange(len(types))
    for i, ((label, s), color) in enumerate(zip(spectra.items(), run_colors(len(spectra)), strict=True)):
        below = s.below(threshold)
        ax.bar(x + i * width - 0.4 + width / 2, [below.get(t, 0.0) for t in types], width, label=label, color=color)
    ax.set_xticks(x, types)
    ax.set(ylabel=f"singular values < {threshold:g} (mean over layers)", title=f"count of singular values of dW < {threshold:g}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    try:
        return _save(fig, out)
    finally:
        plt.close(fig)
