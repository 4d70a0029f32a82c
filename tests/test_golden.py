"""No behaviour change, proven: short runs of each method (and a resume) log exactly the recorded metrics.

The records in tests/golden/metrics.json were written by tests/golden/record.py before the package was
reorganised (issue 19); a refactor that changes any logged value, bit for bit on CPU, fails here. Timing and
memory fields are left out: they measure the machine.
"""

import json
from pathlib import Path

import pytest
from golden.record import METHODS, golden_runs

GOLDEN = json.loads((Path(__file__).parent / "golden" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(prepared_data, tmp_path_factory):
    return golden_runs(prepared_data, tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("name", [*METHODS, "relora-resumed"])
def test_metrics_are_the_recorded_ones_bit_for_bit(runs, name):
    assert runs[name] == GOLDEN[name]


def test_the_golden_runs_cover_merges_restarts_and_a_resume():
    """The comparison means something: the runs restart, prune and evaluate, and the resume is mid-run."""
    relora_records = GOLDEN["relora"]
    assert relora_records[-1]["restarts"] >= 2 and relora_records[-1]["merges"] >= 2
    assert GOLDEN["online-relora"][-1]["merges"] > GOLDEN["relora"][-1]["merges"]
    assert any("val_loss" in r for r in relora_records)
    assert GOLDEN["relora-resumed"] == relora_records  # resuming changes nothing either
