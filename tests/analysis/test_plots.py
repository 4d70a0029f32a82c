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
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, out: figures.append(fig) or fig.canvas.draw() or out)
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
