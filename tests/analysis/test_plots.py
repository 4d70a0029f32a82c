"""relora plot's figures read as a user reads them."""

import numpy as np
import pytest

from relora.analysis import plots
from relora.run.records import Curves


@pytest.mark.parametrize("low, high", [(95, 110), (80, 400), (40, 900), (11, 1100), (20, 5000), (30, 30000),
                                       (20, 200000)])
def test_val_ppl_axis_has_at_least_four_plain_labels(low, high, tmp_path, monkeypatch):
    rng = np.random.default_rng(low)
    val_ppl = sorted(np.exp(rng.uniform(np.log(low), np.log(high), 8)), reverse=True)
    val_ppl[0], val_ppl[-1] = high, low
    run = Curves("r", steps=list(range(1, 41)), loss=list(np.linspace(6, 4, 40)), val_steps=list(range(5, 41, 5)),
                 val_ppl=[float(v) for v in val_ppl])
    figures = _drawn(monkeypatch, render=True)
    plots.plot_curves([run], tmp_path / "loss.png")
    ax = figures[0].axes[1]
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "validation perplexity"
    bottom, top = ax.get_ylim()
    assert bottom <= low and top >= high  # every point visible
    labelled = [(t.get_loc(), t.label1.get_text()) for t in ax.yaxis.get_major_ticks() + ax.yaxis.get_minor_ticks()
                if t.label1.get_visible() and t.label1.get_text() and bottom <= t.get_loc() <= top]
    assert len(labelled) >= 4, labelled
    for loc, text in labelled:  # plain numbers that say where the tick is
        assert float(text) == pytest.approx(loc, rel=1e-6)


def _drawn(monkeypatch, *, render: bool = False) -> list:
    """The figures the plot functions make, kept instead of saved (rendered first when tick labels are read)."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, out: figures.append(fig) or (render and fig.canvas.draw()) or out)
    return figures


@pytest.mark.parametrize("n", [1, 3, 10, 11, 13, 20, 21, 40])
def test_run_colors_are_distinct_and_the_first_ten_are_matplotlibs_default_cycle(n):
    from matplotlib import colors as mcolors
    from matplotlib import rcParams

    rgba = [mcolors.to_rgba(c) for c in plots.run_colors(n)]
    assert len(rgba) == n and len(set(rgba)) == n
    default = [mcolors.to_rgba(c) for c in rcParams["axes.prop_cycle"].by_key()["color"]]
    if n <= len(default):
        assert rgba == default[:n]


def test_thirteen_runs_get_thirteen_colors_in_every_figure(tmp_path, monkeypatch):
    """The default cycle has 10 colors: with more runs, two were drawn alike and the legend could not tell them apart."""
    from matplotlib import colors as mcolors

    from relora.analysis.spectra import UpdateSpectra

    rng = np.random.default_rng(0)
    figures = _drawn(monkeypatch)
    runs = [Curves(f"run{i}", steps=list(range(1, 21)), loss=list(rng.uniform(3, 5, 20)), val_steps=[10, 20],
                   val_ppl=[float(v) for v in rng.uniform(30, 60, 2)]) for i in range(13)]
    plots.plot_curves(runs, tmp_path / "loss.png")
    spectra = {f"run{i}": UpdateSpectra(values={"q": [rng.uniform(0, 3, 8)]}, names={"q": ["l0.q"]}) for i in range(13)}
    plots.plot_spectra(spectra, tmp_path / "spectra.png")
    plots.plot_below_threshold(spectra, tmp_path / "below.png", threshold=1.0)
    loss_lines = figures[0].axes[0].get_lines()
    line_colors = {mcolors.to_rgba(line.get_color()) for line in loss_lines if line.get_label().startswith("run")}
    assert len(line_colors) == 13
    hist_colors = {mcolors.to_rgba(p.get_edgecolor()) for p in figures[1].axes[0].patches}
    assert len(hist_colors) == 13
    bar_colors = {mcolors.to_rgba(p.get_facecolor()) for p in figures[2].axes[0].patches}
    assert len(bar_colors) == 13
