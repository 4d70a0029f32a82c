"""Shared fixtures: tiny models built from configs, CPU only, seeds fixed."""

import contextlib
import os
from pathlib import Path

# One thread for the whole suite, subprocesses included (relora's auto policy keeps an explicit
# OMP_NUM_THREADS): its models are tiny, and on a shared 2-core machine 2 threads ran 4x slower
# (benchmarks/threads.py). Set before torch is imported, so that torch starts with it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer LLaMA small enough for millisecond forward passes."""
    torch.manual_seed(seed)
    config = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config))


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))


TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}


def sample_corpus_data(corpus: Path, out: Path) -> Path:
    """Some stdlib modules copied into ``corpus`` and prepared into ``out`` with a 512-token BPE."""
    from relora.data import default_corpus_files, prepare

    corpus.mkdir(parents=True, exist_ok=True)
    for path in sorted(default_corpus_files(), key=lambda p: p.name)[:80]:
        (corpus / f"{path.parent.name}_{path.name}.txt").write_bytes(path.read_bytes())
    return prepare([corpus], out, vocab_size=512, val_fraction=0.1, progress=False)


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory):
    """A small real corpus (some stdlib modules), tokenized with a 512-token BPE."""
    return sample_corpus_data(tmp_path_factory.mktemp("corpus"), tmp_path_factory.mktemp("data") / "prepared")


def without_test_split(prepared, dest):
    """A copy of a prepared directory as relora prepare wrote it before the test split existed."""
    import json
    import shutil

    shutil.copytree(prepared, dest)
    meta = json.loads((dest / "meta.json").read_text())
    del meta["test_fraction"], meta["splits"]["test"]
    (dest / "meta.json").write_text(json.dumps(meta))
    (dest / "test.bin").unlink()
    return dest


def run_config(data, out, **overrides):
    """A TrainConfig for a seconds-long run of a tiny model."""
    from relora.run.resolve import resolve_config

    values = dict(model=TINY_MODEL, data=str(data), out=str(out), steps=40, warmup_steps=4,
                  warm_start_steps=10, reset_every=10, restart_warmup_steps=3, rank=4, alpha=8,
                  lr=3e-3, relora_lr=6e-3, batch_tokens=256, micro_batch=4, seq_len=32,
                  eval_every=20, eval_tokens=1024, save_every=0, log_every=1, device="cpu")
    values.update(overrides)
    return resolve_config(overrides=values)


@contextlib.contextmanager
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and on a busy machine (another
    job on every core) each of their many small ops waits for a second thread's time slice
    (measured: a 0.4 s fine-tuning test took 120 s with 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def single_thread():
    with one_thread():
        yield


def dense_moments(state):
    """(m or None, [v-like tensors]) as float64 dense tensors, read independently of relora.core.pruning."""
    if "state2" in state:  # bitsandbytes
        if state["state2"].dtype == torch.uint8:
            from bitsandbytes.functional import dequantize_blockwise

            def read(i):  # 8-bit codes: bitsandbytes' own dequantizer (its optimizers use 256-entry blocks)
                return dequantize_blockwise(state[f"state{i}"], absmax=state[f"absmax{i}"], code=state[f"qmap{i}"],
                                            blocksize=256).double()

            return read(1), [read(2)]
        return state["state1"].double(), [state["state2"].double()]
    for row, col in (("row_var", "col_var"), ("exp_avg_sq_row", "exp_avg_sq_col")):  # Adafactor: row col / mean(row)
        if row in state:
            r, c = state[row].double().reshape(-1, 1), state[col].double().reshape(1, -1)
            v = r * c / r.mean() if r.mean() > 0 else torch.zeros(r.numel(), c.numel(), dtype=torch.float64)
            return (state["exp_avg"].double() if "exp_avg" in state else None), [v]
    vs = [state[k].double() for k in ("exp_avg_sq", "max_exp_avg_sq") if k in state]
    return state["exp_avg"].double(), vs
