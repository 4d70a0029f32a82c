"""relora bench: the JSON contract, and measurements that agree with what the cost model says must be there."""

import json

from relora.analysis.bench import BenchSetup
from relora.cli import main


def test_bench_writes_the_contract_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--rank", "4", "--seq-len", "64", "--micro-batch", "2",
                 "--warmup", "1", "--repeats", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "throughput relora/full" in printed and "memory     relora/full" in printed
    result = json.loads(out.read_text())
    for key in ("throughput_ratio", "throughput_bound", "memory_ratio", "memory_bound"):
        assert result[key] > 0, key
    cost = BenchSetup.from_preset("tiny", rank=4, seq_len=64, micro_batch=2).cost_model()
    for method in ("full", "relora"):
        m = result["methods"][method]
        assert m["tokens_per_s"] > 0 and len(m["step_s_all"]) == 2
        assert m["trainable_params"] == cost.trainable_params(method)
        # weights, gradients and both Adam moments are all allocated by the end of a step
        assert m["peak_mem_bytes"] >= 0.9 * cost.state_bytes(method)["total"], (method, m["peak_mem_bytes"])
    assert result["throughput_ratio"] == result["methods"]["relora"]["tokens_per_s"] / result["methods"]["full"]["tokens_per_s"]


def test_bench_explain_measures_nothing(capsys):
    assert main(["bench", "--preset", "1b", "--rank", "128", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "throughput bound relora / full" in out and "memory bound relora / full" in out


def test_bench_merge_timing_and_bad_input(capsys):
    assert main(["bench", "--preset", "tiny", "--rank", "4", "--seq-len", "32", "--methods", "relora",
                 "--warmup", "0", "--repeats", "1", "--no-memory", "--merge"]) == 0
    assert "merge_and_reinit" in capsys.readouterr().out
    assert main(["bench", "--preset", "tiny", "--methods", "galore"]) == 2
    assert "unknown bench method 'galore'" in capsys.readouterr().err
    assert main(["bench", "--preset", "tiny", "--frozen-dtype", "fp8"]) == 2


def test_largest_fitting_micro_batch_search_agrees_with_brute_force():
    import random

    from relora.analysis.bench import largest_fitting

    rng = random.Random(0)
    for limit in (1, 7, 64, 4096):
        for _ in range(50):
            capacity = rng.randint(0, limit + 5)  # the largest size that fits (0: nothing fits)
            trials = []

            def fits(n, capacity=capacity, trials=trials):
                trials.append(n)
                return n <= capacity

            assert largest_fitting(fits, limit) == max([n for n in range(1, limit + 1) if n <= capacity], default=0)
            assert len(trials) <= 2 * limit.bit_length() + 2  # doubling then bisecting, not a linear scan


def test_max_micro_batch_on_cpu_is_a_one_line_error(capsys):
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--max-micro-batch", "--no-memory"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-micro-batch needs a CUDA device" in err[0]


def test_max_micro_batch_finds_the_largest_step_that_does_not_run_out_of_memory(monkeypatch):
    """The CUDA-only search, driven on CPU with a step that raises OutOfMemoryError above a capacity."""
    from dataclasses import replace

    import torch

    from relora.analysis import bench

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tried = []

    def make_step(setup, m, o):
        assert m is model and o is optimizer
        tried.append(setup.micro_batch)

        def step():
            if setup.micro_batch > 37:
                raise torch.OutOfMemoryError("fake")
        return step

    monkeypatch.setattr(bench, "build", lambda setup, method: (model, optimizer))
    monkeypatch.setattr(bench, "make_step", make_step)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    setup = replace(BenchSetup.from_preset("tiny", rank=4, seq_len=32, micro_batch=2), device="cuda")
    assert bench.max_micro_batch(setup, "relora", limit=256) == 37
    assert 37 in tried and 38 in tried
