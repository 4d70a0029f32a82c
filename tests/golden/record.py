"""Record the golden metrics of tests/test_golden.py (run once, before a change that must not alter behaviour).

    python tests/golden/record.py      # rewrites tests/golden/metrics.json

The golden file is the proof of "no behaviour change" for refactors (issue 19): the same short runs after the
change must give the same records on CPU (timing and memory fields aside; floats to float32 rounding,
which differs between CPUs with and without AVX-512). Only re-record when a
change of behaviour is intended, and say so in the commit.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # conftest's tiny model and data

# What the runs log that depends on the machine, not on the computation.
VOLATILE = ("tokens_per_s", "peak_mem_bytes")
METHODS = ("full", "lora-ws", "relora", "online-relora", "galore")
RESUME_AT = 15  # inside a cycle and a logging window


def settings(method: str) -> dict:
    extra = {"merge_every": 5} if method == "online-relora" else {}
    return dict(method=method, steps=40, save_every=5, keep_checkpoints=10, log_every=2, eval_every=10,
                weight_decay=0.1, dropout=0.1, **extra)


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in lines]


def golden_runs(data: Path, work: Path) -> dict[str, list[dict]]:
    """Each method's records, and relora's records after a resume at step RESUME_AT."""
    from conftest import one_thread, run_config

    from relora.run import checkpoint as ckpt
    from relora.train import train

    out: dict[str, list[dict]] = {}
    with one_thread():
        for method in METHODS:
            run = work / method
            train(run_config(data, run, **settings(method)), progress=False)
            out[method] = records(run)
        resumed = work / "relora-resumed"
        shutil.copytree(work / "relora", resumed)
        shutil.rmtree(resumed / "final")
        for path in ckpt.list_checkpoints(resumed / "checkpoints"):
            if int(path.name.split("_")[1]) > RESUME_AT:
                shutil.rmtree(path)
        train(run_config(data, resumed, **settings("relora")), resume=True, progress=False)
        out["relora-resumed"] = records(resumed)
    return out


def corpus_data(work: Path) -> Path:
    """The prepared_data fixture's corpus, made the same way."""
    from conftest import sample_corpus_data

    return sample_corpus_data(work / "corpus", work / "data" / "prepared")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        runs = golden_runs(corpus_data(Path(tmp)), Path(tmp) / "runs")
    target = HERE / "metrics.json"
    tmp_file = target.with_name(".metrics.json.tmp")
    tmp_file.write_text(json.dumps(runs, indent=1) + "\n")
    tmp_file.replace(target)
    print(f"wrote {target}: {', '.join(f'{k} ({len(v)} records)' for k, v in runs.items())}")
