"""Presets, LLaMA configs, parameter budgets, the control model, loading saved models."""

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

import relora
from relora.errors import ConfigError
from relora.models import (
    build_model,
    control_model_config,
    count_parameters,
    list_presets,
    llama_config,
    load_preset,
    load_pretrained,
    relora_trainable_parameters,
)

PRESETS = ["tiny", "9m", "20m", "60m", "130m", "250m", "350m", "1b", "pico-small", "pico-tiny"]
TRAIN_FIELDS = {
    "lr", "relora_lr", "batch_tokens", "micro_batch", "seq_len", "steps", "warmup_steps", "warm_start_steps",
    "reset_every", "restart_warmup_steps", "rank", "alpha", "eval_every", "eval_tokens", "save_every", "vocab_size",
}
# Paper Table 1 (RELORA_SPEC.md section 8); 1b with 32 heads and 24 layers, as the authors' reference configs.
# name: (hidden, intermediate, heads, layers, lr, batch tokens, seq, tokens)
PAPER = {
    "60m": (512, 1376, 8, 8, 1e-3, 122_880, 256, 1.2e9),
    "130m": (768, 2048, 12, 12, 1e-3, 153_600, 256, 2.6e9),
    "250m": (768, 2560, 16, 24, 5e-4, 589_824, 512, 6.8e9),
    "350m": (1024, 2736, 16, 24, 5e-4, 589_824, 512, 6.8e9),
    "1b": (2048, 5461, 32, 24, 4e-4, 786_432, 512, 23.1e9),
}
SMALL = {"hidden_size": 32, "intermediate_size": 88, "num_attention_heads": 4, "num_hidden_layers": 2}


def meta_parameter_count(model_cfg: dict, vocab_size: int) -> int:
    """Count a real LlamaForCausalLM's parameters without allocating them."""
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(model_cfg, vocab_size, 16))
    return count_parameters(model)[1]


def test_list_presets_has_every_preset_smallest_first():
    assert list_presets() == PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_preset_has_model_and_known_train_fields(name):
    preset = load_preset(name)
    assert set(preset) == {"model", "train"}
    train = preset["train"]
    assert set(train) == TRAIN_FIELDS | ({"dropout"} if name.startswith("pico-") else set())
    config = llama_config(preset["model"], train["vocab_size"], train["seq_len"])
    assert config.max_position_embeddings == train["seq_len"]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_schedule_is_consistent(name):
    t = load_preset(name)["train"]
    sequences = t["batch_tokens"] // t["seq_len"]
    assert sequences * t["seq_len"] == t["batch_tokens"]
    assert sequences % t["micro_batch"] == 0
    assert t["warmup_steps"] < t["warm_start_steps"] < t["steps"]
    assert t["restart_warmup_steps"] <= t["reset_every"]
    restarts = range(t["warm_start_steps"] + t["reset_every"], t["steps"], t["reset_every"])
    assert len(restarts) >= 2, "a ReLoRA preset should restart at least twice"
    assert 1.5 <= t["relora_lr"] / t["lr"] <= 2.0  # spec section 6


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_match_table_1(name):
    hidden, inter, heads, layers, lr, batch, seq, tokens = PAPER[name]
    preset = load_preset(name)
    assert preset["model"] == {
        "hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": heads, "num_hidden_layers": layers,
    }
    t = preset["train"]
    assert (t["lr"], t["batch_tokens"], t["seq_len"]) == (lr, batch, seq)
    assert abs(t["steps"] * batch - tokens) / tokens < 0.05
    assert (t["rank"], t["alpha"], t["restart_warmup_steps"], t["vocab_size"]) == (128, 32, 100, 32100)


def test_tiny_preset_builds_a_5_to_10m_model():
    preset = load_preset("tiny")
    model = build_model(llama_config(preset["model"], preset["train"]["vocab_size"], preset["train"]["seq_len"]), 0)
    trainable, total = count_parameters(model)
    assert trainable == total
    assert 5e6 <= total <= 10e6


@pytest.mark.parametrize("name,low,high", [("9m", 8e6, 10e6), ("20m", 18e6, 22e6)])
def test_cpu_presets_have_their_size(name, low, high):
    preset = load_preset(name)
    assert low <= meta_parameter_count(preset["model"], preset["train"]["vocab_size"]) <= high


@pytest.mark.parametrize("name, width, ffn, low, high", [
    ("pico-tiny", 96, 384, 10.5e6, 11.5e6),  # they report 11M
    ("pico-small", 384, 1536, 63e6, 67e6),  # they report 66M; the same recipe as pico-tiny, only wider
])
def test_pico_presets_are_relora_picos_architectures(name, width, ffn, low, high):
    """Weiss et al. 2025 (issue 18): 12 layers, 12 heads, 4 KV heads, d_model x FFN; their sizes at a 50k vocabulary."""
    preset = load_preset(name)
    config = llama_config(preset["model"], 50_257, 128)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (12, 12, 4)
    assert (config.hidden_size, config.intermediate_size) == (width, ffn)
    kv = width // 12 * 4
    per_layer = 2 * width * width + 2 * width * kv + 3 * width * ffn + 2 * width  # q, o; k, v; SwiGLU; 2 norms
    expected = 12 * per_layer + 2 * 50_257 * width + width  # + untied embedding and head + final norm
    assert meta_parameter_count(preset["model"], 50_257) == expected
    assert low <= expected <= high
    assert preset["train"] == load_preset("pico-tiny")["train"]


def test_llama_config_is_llama_as_the_paper_trains_it():
    model = build_model(llama_config(SMALL, 64, 16), 0)
    assert not [name for name, _ in model.named_parameters() if name.endswith("bias")]
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.hidden_act == "silu"
    assert model.config._attn_implementation == "sdpa"
    layer = model.model.layers[0]
    assert isinstance(layer.mlp, LlamaMLP)
    assert {"gate_proj", "up_proj", "down_proj"} <= dict(layer.mlp.named_children()).keys()
    assert isinstance(layer.input_layernorm, LlamaRMSNorm) and isinstance(model.model.norm, LlamaRMSNorm)
    assert model.dtype == torch.float32


def test_swiglu_mlp_computes_down_of_silu_gate_times_up():
    mlp = build_model(llama_config(SMALL, 64, 16), 0).model.layers[0].mlp
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    expected = mlp.down_proj(nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize("hidden,layers,rank,heads", [(32, 1, 2, 4), (48, 3, 5, 6), (64, 2, 16, 2)])
def test_relora_trainable_parameters_counts_a_wrapped_model(hidden, layers, rank, heads):
    arch = {"hidden_size": hidden, "intermediate_size": 8 * -(-hidden // 3), "num_attention_heads": heads,
            "num_hidden_layers": layers}
    model = build_model(llama_config(arch, 50, 16), 0)
    relora.wrap(model, relora.ReLoRAConfig(r=rank, reset_every=None))
    assert relora_trainable_parameters(arch, 50, rank) == count_parameters(model)[0]


def test_relora_trainable_parameters_follows_grouped_query_attention():
    arch = {**SMALL, "num_key_value_heads": 2}
    model = build_model(llama_config(arch, 50, 16), 0)
    relora.wrap(model, relora.ReLoRAConfig(r=3, reset_every=None))
    assert relora_trainable_parameters(arch, 50, 3) == count_parameters(model)[0]


@pytest.mark.parametrize("name", ["tiny", "60m"])
def test_control_model_has_relora_trainable_count(name):
    preset = load_preset(name)
    vocab, rank = preset["train"]["vocab_size"], preset["train"]["rank"]
    budget = relora_trainable_parameters(preset["model"], vocab, rank)
    control = control_model_config(preset["model"], vocab, rank)
    count = meta_parameter_count(control, vocab)
    assert abs(count - budget) / budget < 0.05
    assert count < meta_parameter_count(preset["model"], vocab)
    assert control["hidden_size"] % control["num_attention_heads"] == 0
    assert (control["hidden_size"] // control["num_attention_heads"]) % 2 == 0
    assert control["num_hidden_layers"] <= preset["model"]["num_hidden_layers"]


def test_control_model_is_impossible_when_rank_exceeds_the_model():
    with pytest.raises(ConfigError, match="lower the rank"):
        control_model_config(SMALL, 64, 64)


def test_control_model_is_impossible_when_no_size_is_close():
    # A 128-word vocabulary leaves nothing to trade: every smaller LLaMA is >5% off ReLoRA's count.
    with pytest.raises(ConfigError, match="raise the rank or lower the vocabulary"):
        control_model_config(SMALL, 128, 1)


def test_build_model_is_deterministic_per_seed_and_keeps_global_rng():
    config = llama_config(SMALL, 64, 16)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = build_model(config, 0), build_model(config, 0), build_model(config, 1)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert not torch.equal(a.model.layers[0].self_attn.q_proj.weight, c.model.layers[0].self_attn.q_proj.weight)


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown preset '60M'.*did you mean '60m'.*--config FILE"):
        load_preset("60M")


def test_unknown_model_key_suggests_the_llama_field():
    with pytest.raises(ConfigError, match=r"'num_hidden_layer'.*did you mean 'num_hidden_layers'"):
        llama_config({**SMALL, "num_hidden_layer": 2}, 64, 16)


def test_model_config_passes_llama_fields_through():
    config = llama_config({**SMALL, "num_key_value_heads": 2, "rope_theta": 5e5}, 64, 16)
    assert config.num_key_value_heads == 2
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}  # transformers 5 / 4
    assert rope["rope_theta"] == 5e5


def test_model_config_rejects_run_keys_and_missing_or_bad_sizes():
    with pytest.raises(ConfigError, match="vocab_size"):
        llama_config({**SMALL, "vocab_size": 10}, 64, 16)
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        llama_config({k: v for k, v in SMALL.items() if k != "num_hidden_layers"}, 64, 16)
    with pytest.raises(ConfigError, match="hidden_size must be a positive integer"):
        llama_config({**SMALL, "hidden_size": 0}, 64, 16)
    with pytest.raises(ConfigError, match="multiple of num_attention_heads"):
        llama_config({**SMALL, "num_attention_heads": 5}, 64, 16)


def test_load_pretrained_round_trips_a_saved_model(tmp_path):
    model = build_model(llama_config(SMALL, 64, 16), 0)
    model.save_pretrained(tmp_path / "saved")
    loaded = load_pretrained(tmp_path / "saved")
    assert loaded.dtype == torch.float32
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_load_pretrained_rejects_missing_and_non_model_dirs(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="no config.json"):
        load_pretrained(tmp_path)
