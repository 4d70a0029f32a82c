"""Quantized frozen weights (NF4 / int8 through bitsandbytes): function, merge error, master weights, training.

Every bound is computed here from the storage format itself (the NF4 code table of the QLoRA paper,
int8 row-wise absmax / 127), never from relora.integrations.quantize.
"""

import json
import shutil
import sys

import pytest
import torch
from conftest import one_thread, run_config, tiny_llama
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import relora
from relora.analysis.bench import BenchSetup
from relora.analysis.costs import CostModel
from relora.analysis.quant_bench import measure_memory
from relora.cli import main
from relora.core import adapters
from relora.integrations import quantize
from relora.models import count_parameters, llama_config, load_preset
from relora.run import checkpoint as ckpt
from relora.run.build import make_model
from relora.run.config import TrainConfig
from relora.train import train

# NF4 (QLoRA paper, Appendix E): the 16 values a 4-bit code stands for, times its block's absmax.
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0], dtype=torch.float64)
BLOCK = 64
QUANT_TYPES = ["nf4", "int8"]
# down_proj's rows (96 weights) are not whole NF4 blocks: the case bitsandbytes 0.50.2's CPU kernel got wrong
SHAPES = {"hidden_size": 64, "intermediate_size": 96}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def decoded(layer) -> torch.Tensor:
    """The float64 weight a quantized base layer stores, decoded by hand from its raw codes and scales."""
    base = layer.get_base_layer()
    if type(base).__name__ == "Linear4bit":
        packed = base.weight.data.reshape(-1).to(torch.int64)
        codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)  # high nibble first
        absmax = base.weight.quant_state.absmax.double()
        values = NF4[codes].reshape(-1, BLOCK) * absmax.unsqueeze(1)
        return values.reshape(base.out_features, base.in_features)
    scales = base.weight.SCB if base.weight.SCB is not None else base.state.SCB
    return base.weight.data.double() * scales.double().unsqueeze(1) / 127


def half_step(target: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Per entry, half the gap between the two representable values around ``target`` (float64), with the
    scales (block or row absmax) that quantizing ``target`` sets: the most a round-to-nearest can be off."""
    if quant_type == "int8":
        return (target.abs().amax(dim=1, keepdim=True) / 127 / 2).expand_as(target)
    blocks = target.reshape(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scaled = (blocks / absmax).clamp(-1, 1)
    upper = torch.searchsorted(NF4, scaled.contiguous()).clamp(1, 15)
    gap = NF4[upper] - NF4[upper - 1]
    return (gap / 2 * absmax).reshape(target.shape)


def delta64(layer) -> torch.Tensor:
    """s B A in float64, from the adapter's own parameters."""
    return layer.scaling["default"] * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()


def quantized_model(quant_type, master_weights=None, *, seed=0, **overrides):
    model = tiny_llama(seed, **SHAPES, **overrides)
    relora.wrap(model, relora.ReLoRAConfig(r=8, alpha=16, reset_every=None, quantize=quant_type,
                                           master_weights=master_weights, seed=seed))
    return model


def randomize_b(model, std: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters.lora_layers(model):
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=generator) * std)


# ------------------------------------------------------------------ (a) the wrapped model's function
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantized_model_computes_with_the_dequantized_weights_and_stays_close_to_the_original(quant_type):
    reference = tiny_llama(0, **SHAPES)
    model = quantized_model(quant_type)
    layers = adapters.lora_layers(model)
    assert {type(layer).__module__ for layer in layers} == {"peft.tuners.lora.bnb"}  # peft's quantized LoRA layers
    assert {type(layer.get_base_layer()).__name__ for layer in layers} == {
        "nf4": {"Linear4bit"}, "int8": {"Linear8bitLt"}}[quant_type]
    # the same model with every wrapped weight replaced by its decoded codes: an independent simulation
    simulated = tiny_llama(0, **SHAPES)
    with torch.no_grad():
        for name, module in model.named_modules():
            if module in layers:
                simulated.get_submodule(name).weight.copy_(decoded(module).float())
    tokens = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # training mode (no dropout here): the matmul path training steps use
        got, sim, exact = model(tokens).logits, simulated(tokens).logits, reference(tokens).logits
    # 1. it multiplies by exactly the stored weights: equal to float32 rounding of a different summation order
    torch.testing.assert_close(got, sim, rtol=1e-5, atol=1e-5)
    # 2. against the unquantized model the logits move by what the weights moved, not more: the relative
    # RMS change of the logits stays within 3x the largest relative RMS change of a wrapped weight
    # (7 maps per layer, 2 layers: the per-map errors are independent and do not compound at this depth).
    weight_error = max(
        ((decoded(m) - reference.get_submodule(n).weight.double()).norm() / reference.get_submodule(n).weight.norm()).item()
        for n, m in model.named_modules() if m in layers)
    logit_error = ((got - exact).norm() / exact.norm()).item()
    assert 0 < logit_error <= 3 * weight_error, (logit_error, weight_error)
    # the storage formats' RMS errors on Gaussian weights: int8 < 1%, NF4 about 10%
    assert weight_error < {"int8": 0.01, "nf4": 0.15}[quant_type]


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantized_storage_takes_the_bytes_the_cost_model_says(quant_type):
    model = quantized_model(quant_type)
    for layer in adapters.lora_layers(model):
        base = layer.get_base_layer()
        expected = base.in_features * base.out_features * quantize.frozen_bytes_per_weight(quant_type, base.in_features)
        assert quantize.storage_bytes(base) == pytest.approx(expected)
    # an NF4 tensor packs two weights per byte: parameter counts still count weights
    assert count_parameters(model)[1] == count_parameters(quantized_model(None))[1]


# ------------------------------------------------------------------ (b) one merge
@pytest.mark.parametrize("master_weights", [None, "cpu"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_one_merge_adds_sBA_up_to_one_requantization(quant_type, master_weights):
    model = quantized_model(quant_type, master_weights)
    randomize_b(model, 0.02, seed=1)
    layers = adapters.lora_layers(model)
    starts = [quantize.master_weight(layer.get_base_layer()) for layer in layers]
    before = [decoded(layer) if start is None else start.double() for layer, start in zip(layers, starts)]
    deltas = [delta64(layer) for layer in layers]
    storage = [layer.get_base_layer().weight for layer in layers]
    relora.merge_and_reinit(model, seed=5)
    worst = 0.0
    for layer, w0, d, tensor in zip(layers, before, deltas, storage):
        target = w0 + d
        error = (decoded(layer) - target).abs()
        bound = half_step(target, quant_type)
        assert (error <= bound * (1 + 1e-5) + 1e-7).all()  # float32 arithmetic on top of the rounding
        worst = max(worst, (error / bound).max().item())
        assert layer.get_base_layer().weight is tensor  # written in place: same parameter object
        if master_weights:  # the master holds the exact float32 sum
            torch.testing.assert_close(quantize.master_weight(layer.get_base_layer()).double(), target,
                                       rtol=0, atol=1e-6)
    assert 0.9 < worst <= 1.0 + 1e-5  # the bound is reached: the rounding is real and nearest


# ------------------------------------------------------------------ (c) many merges
def merge_errors(quant_type, master_weights, merges, std):
    """Max |stored - exact| in half steps, and the RMS error relative to the weights' RMS, after each merge,
    against an independent float64 accumulation of the original weights and every s B A."""
    reference = tiny_llama(0, **SHAPES)
    model = quantized_model(quant_type, master_weights)
    layers = adapters.lora_layers(model)
    names = [n for n, m in model.named_modules() if m in layers]
    exact = [reference.get_submodule(n).weight.double() for n in names]
    history = []
    for k in range(merges):
        randomize_b(model, std, seed=100 + k)
        exact = [w + delta64(layer) for w, layer in zip(exact, layers)]
        relora.merge_and_reinit(model, seed=200 + k)
        steps = max(((decoded(layer) - w).abs() / half_step(w, quant_type)).max().item()
                    for layer, w in zip(layers, exact))
        rms = max(((decoded(layer) - w).norm() / w.norm()).item() for layer, w in zip(layers, exact))
        history.append((steps, rms))
    return history


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_master_weights_keep_ten_merges_within_one_step_and_without_them_error_grows(quant_type):
    # updates smaller than a quantization step (median 0.09 steps for NF4, 0.31 for int8), as a ReLoRA cycle's
    # are likely to be: the size where roundings pile up, or round the update away
    std = {"int8": 0.0005, "nf4": 0.002}[quant_type]
    with_master = merge_errors(quant_type, "cpu", 10, std)
    without = merge_errors(quant_type, None, 10, std)
    print(f"\n{quant_type}: max error in half steps after merges 1..10, with master "
          f"{[round(s, 2) for s, _ in with_master]}, without {[round(s, 2) for s, _ in without]}; "
          f"relative RMS error after 1 / 10 merges: with master {with_master[0][1]:.4f} / {with_master[-1][1]:.4f}, "
          f"without {without[0][1]:.4f} / {without[-1][1]:.4f}")
    assert all(steps <= 1 + 1e-4 for steps, _ in with_master)  # one rounding of the exact sum, every time
    assert with_master[-1][1] < 1.2 * with_master[0][1]  # and its size does not grow
    assert without[-1][0] > 1.5  # without: beyond one rounding ...
    assert without[-1][1] > 1.5 * without[0][1]  # ... and growing with the number of merges
    assert without[-1][1] > 1.5 * with_master[-1][1]


# ------------------------------------------------------------------ (d) training, checkpoints, export
def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_nf4_training_loss_falls_over_restarts_and_exports_a_plain_model(prepared_data, tmp_path):
    summary = train(run_config(prepared_data, tmp_path, quantize="nf4", steps=50), progress=False)
    logged = records(tmp_path)
    first = sum(r["loss"] for r in logged[:5]) / 5
    after_switch = [r["loss"] for r in logged if r["step"] > 10]
    assert summary.restarts == 3  # steps 20, 30, 40
    assert sum(after_switch[-5:]) / 5 < first - 0.5
    assert sum(after_switch[-5:]) / 5 < sum(after_switch[:5]) / 5  # and it keeps falling with quantized weights
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert type(exported).__name__ == "LlamaForCausalLM"
    assert {p.dtype for p in exported.parameters()} == {torch.float32}
    assert not any("lora" in k or "absmax" in k for k in load_file(tmp_path / "final" / "model.safetensors"))

    # the export is the last checkpoint's float32 sum: dequantized weights plus the last cycle's s B A
    cfg = run_config(prepared_data, tmp_path, quantize="nf4", steps=50)
    wrapped = make_model(cfg, 512)
    relora.wrap(wrapped, cfg.relora_config())
    ckpt.load_weights(wrapped, ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    for name, module in wrapped.named_modules():
        if module in adapters.lora_layers(wrapped):
            expected = decoded(module) + delta64(module)
            torch.testing.assert_close(exported.get_submodule(name).weight.double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("quant_type,master_weights", [("nf4", "cpu"), ("int8", None)])
def test_quantized_resume_is_bit_identical(quant_type, master_weights, prepared_data, tmp_path):
    """40 steps straight == stopped at step 25 (after the restart at 20) and resumed; CPU."""
    settings = dict(quantize=quant_type, master_weights=master_weights, save_every=5, keep_checkpoints=20)
    full = tmp_path / "full"
    train(run_config(prepared_data, full, **settings), progress=False)
    last = ckpt.latest_checkpoint(full / "checkpoints")
    assert (last / ckpt.MASTER_WEIGHTS).is_file() == bool(master_weights)
    split = tmp_path / "split"
    shutil.copytree(full, split)
    shutil.rmtree(split / "final")
    for path in ckpt.list_checkpoints(split / "checkpoints"):
        if int(path.name.split("_")[1]) > 25:
            shutil.rmtree(path)
    train(run_config(prepared_data, split, **settings), resume=True, progress=False)
    for name in ("checkpoints/step_40/model.safetensors", "final/model.safetensors") + (
            (f"checkpoints/step_40/{ckpt.MASTER_WEIGHTS}",) if master_weights else ()):
        a, b = load_file(full / name), load_file(split / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_mem_bytes")} for r in rs]  # noqa: E731
    assert strip(records(full)) == strip(records(split))


def test_resume_refuses_a_change_of_quantization(prepared_data, tmp_path, capsys):
    train(run_config(prepared_data, tmp_path, quantize="nf4", steps=20), progress=False)
    assert main(["train", "--out", str(tmp_path), "--resume", "--quantize", "int8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "different quantize" in err


def test_cli_export_of_a_quantized_checkpoint_is_dense(prepared_data, tmp_path, capsys):
    train(run_config(prepared_data, tmp_path / "run", quantize="int8", master_weights="cpu", steps=20),
          progress=False)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    for (name, a), (_, b) in zip(exported.named_parameters(), final.named_parameters()):
        assert torch.equal(a, b), name  # the checkpoint at the last step exports what training exported


def test_ddp_with_nf4_and_master_weights_matches_one_process(prepared_data, tmp_path):
    from run.test_distributed import SETTINGS, torchrun  # tests/run/test_distributed.py

    flags = ["--quantize", "nf4", "--master-weights", "cpu"]
    done = torchrun(tmp_path, prepared_data, tmp_path / "ddp", *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    settings = {k: v for k, v in SETTINGS.items() if k != "model"}
    train(run_config(prepared_data, tmp_path / "one", quantize="nf4", master_weights="cpu", **settings),
          progress=False)
    # same global batch over two ranks: the same curve up to the order of float reductions
    assert [r["loss"] for r in records(tmp_path / "ddp")] == pytest.approx(
        [r["loss"] for r in records(tmp_path / "one")], rel=1e-5)
    assert (ckpt.latest_checkpoint(tmp_path / "ddp" / "checkpoints") / ckpt.MASTER_WEIGHTS).is_file()


# ------------------------------------------------------------------ (e) bad input
@pytest.mark.parametrize("args,message", [
    (["--quantize", "int4"], "quantize must be one of nf4, int8"),
    (["--master-weights", "cpu"], "master_weights needs quantize"),
    (["--quantize", "nf4", "--master-weights", "gpu"], "master_weights must be one of cpu"),
    (["--quantize", "nf4", "--method", "full"], "quantize stores the frozen weights of adapter methods"),
    (["--quantize", "nf4", "--distributed", "fsdp"], "quantize does not work with --distributed fsdp"),
])
def test_bad_quantize_flags_are_one_line_errors(args, message, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--data", str(tmp_path), *args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_quantize_without_bitsandbytes_names_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    assert main(["train", "--out", str(tmp_path / "run"), "--quantize", "nf4", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "needs bitsandbytes" in err and "pip install 'relora[quantize]'" in err
    with pytest.raises(quantize.BitsAndBytesMissing, match="relora\\[quantize\\]"):
        quantized_model("int8")


def test_exporting_a_quantized_checkpoint_without_bitsandbytes_is_a_one_line_error(prepared_data, tmp_path, capsys,
                                                                                    monkeypatch):
    train(run_config(prepared_data, tmp_path / "run", quantize="nf4", steps=20), progress=False)
    capsys.readouterr()  # the run's own output
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'relora[quantize]'" in err, err


# ------------------------------------------------------------------ cost model and benchmark
def test_cost_model_frozen_bytes_by_hand():
    """350m: int8 is 1 byte per weight plus a float32 scale per output row; NF4 half a byte plus a float32
    absmax per 64 weights."""
    config = llama_config(load_preset("350m")["model"], 32100, 512)
    h, f, layers = 1024, 2736, 24
    weights = layers * (4 * h * h + 3 * h * f)
    rows = layers * (4 * h + 2 * f + h)  # q, k, v, o and gate, up have h inputs each; down has f
    assert CostModel(config, 512, 64).frozen_weight_bytes == 4 * weights
    assert CostModel(config, 512, 64, quantize="int8").frozen_weight_bytes == weights + 4 * rows
    assert CostModel(config, 512, 64, quantize="nf4").frozen_weight_bytes == weights // 2 + 4 * weights // 64
    full = CostModel(config, 512, 64)
    for quant_type in QUANT_TYPES:
        cost = CostModel(config, 512, 64, quantize=quant_type)
        assert cost.state_bytes("relora")["total"] == (full.state_bytes("relora")["total"] - 4 * weights
                                                       + cost.frozen_weight_bytes)
        assert cost.memory_bound < full.memory_bound


def test_bench_quantize_reports_each_format(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--rank", "4", "--seq-len", "32", "--micro-batch", "1", "--warmup", "0",
                 "--repeats", "1", "--no-memory", "--quantize", "none,int8,nf4", "--json", str(out)]) == 0
    assert "frozen MiB" in capsys.readouterr().out
    formats = json.loads(out.read_text())["formats"]
    assert list(formats) == ["none", "int8", "nf4"]
    for m in formats.values():  # measured from the tensors == the cost model
        assert m["frozen_bytes"] == m["frozen_bytes_model"] and m["tokens_per_s"] > 0
    assert formats["nf4"]["frozen_bytes"] < formats["int8"]["frozen_bytes"] < formats["none"]["frozen_bytes"] / 3
    setup = BenchSetup.from_preset("tiny", rank=4, seq_len=32, micro_batch=1, device="cpu")
    measured = measure_memory(setup, "nf4", steps=1)
    assert measured["peak_mem_bytes"] > measured["frozen_bytes"] > 0
    assert main(["bench", "--preset", "tiny", "--quantize", "none,int4"]) == 2
    assert "unknown --quantize format 'int4'" in capsys.readouterr().err


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_gpt2_conv1d_layers_are_quantized_trained_and_exported_as_conv1d(quant_type, prepared_data, tmp_path):
    """GPT-2 stores its linear maps as transformers' Conv1D, weight (in, out): quantized as the map they are,
    trained from the CLI, and exported as Conv1D again, holding the dequantized weight plus the last cycle."""
    import transformers

    torch.manual_seed(0)
    init = AutoModelForCausalLM.from_config(transformers.GPT2Config(
        vocab_size=600, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0))
    init.save_pretrained(tmp_path / "gpt2")
    convs = {name: m.weight.detach().double().T for name, m in init.named_modules() if type(m).__name__ == "Conv1D"}
    wrapped = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    relora.wrap(wrapped, relora.ReLoRAConfig(r=4, reset_every=None, quantize=quant_type))
    layers = {name: m for name, m in wrapped.named_modules() if m in adapters.lora_layers(wrapped)}
    assert set(layers) == {n for n in convs if not n.endswith("lm_head")} and len(layers) == 8
    for name, layer in layers.items():  # each stored weight is the map's (out, in) weight, rounded once
        error = (decoded(layer) - convs[name]).abs()
        assert (error <= half_step(convs[name], quant_type) * (1 + 1e-5) + 1e-12).all(), name

    assert main(["train", "--init-from", str(tmp_path / "gpt2"), "--data", str(prepared_data),
                 "--out", str(tmp_path / "run"), "--quantize", quant_type, "--steps", "6", "--reset-every", "2",
                 "--restart-warmup-steps", "1", "--rank", "4", "--batch-tokens", "128", "--micro-batch", "2",
                 "--seq-len", "32", "--eval-every", "0", "--eval-tokens", "64", "--save-every", "0",
                 "--device", "cpu", "--no-progress"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert type(exported).__name__ == "GPT2LMHeadModel"
    last = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    relora.wrap(trained, TrainConfig(**ckpt.read_config(last)).relora_config())
    ckpt.load_weights(trained, last)
    assert max(float(layer.lora_B["default"].weight.abs().max()) for layer in adapters.lora_layers(trained)) > 0
    for name, layer in ((n, m) for n, m in trained.named_modules() if m in adapters.lora_layers(trained)):
        conv = exported.get_submodule(name)
        assert type(conv).__name__ == "Conv1D" and conv.weight.shape == convs[name].T.shape
        torch.testing.assert_close(conv.weight.double().T, decoded(layer) + delta64(layer), rtol=0, atol=1e-6)


@pytest.mark.parametrize("quant_type,master_weights", [("nf4", "cpu"), ("int8", None), ("int8", "cpu")])
def test_weight_decay_scales_a_quantized_frozen_weight_exactly(quant_type, master_weights):
    """decay_frozen_ scales the weight a quantized layer stands for (codes unchanged, scales multiplied)."""
    model = quantized_model(quant_type, master_weights)
    layers = adapters.lora_layers(model)
    model(torch.randint(0, 128, (2, 8)))  # int8 layers move their scales into their state on the first forward
    before = [decoded(layer) for layer in layers]
    masters = [quantize.master_weight(layer.get_base_layer()) for layer in layers]
    masters_before = [m.clone() if m is not None else None for m in masters]
    adapters.decay_frozen_(model, 0.99)
    for layer, weight, master, master0 in zip(layers, before, masters, masters_before):
        torch.testing.assert_close(decoded(layer), 0.99 * weight, rtol=1e-6, atol=0)
        if master_weights:
            torch.testing.assert_close(master, 0.99 * master0, rtol=1e-6, atol=0)
