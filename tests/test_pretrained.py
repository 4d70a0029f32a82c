"""Continued pretraining of existing Hugging Face causal LMs (LLaMA, Mistral, Qwen2, GPT-2, GPT-NeoX).

Every model is a tiny random one built from its config class and saved to a
temporary directory: nothing is downloaded.
"""

import pytest
import torch
import transformers
from conftest import run_config
from transformers import AutoModelForCausalLM

from relora.cli import main
from relora.core.adapters import find_targets, lora_layers, wrap
from relora.run import checkpoint as ckpt
from relora.run.build import model_from_checkpoint
from relora.train import train

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 600  # >= the prepared data's 512
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
             max_position_embeddings=64)
FAMILIES = {
    "llama": (lambda: transformers.LlamaConfig(**SMALL),
              {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "mistral": (lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=2),
                {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "qwen2": (lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2),
              {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "gpt2": (lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                             bos_token_id=0, eos_token_id=0),
             {"c_attn", "c_proj", "c_fc"}),
    "gpt_neox": (lambda: transformers.GPTNeoXConfig(**SMALL),
                 {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
}
CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM"}


def tiny_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(FAMILIES[family][0]()).float()


def saved_model(family: str, path) -> transformers.PreTrainedModel:
    model = tiny_model(family)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_are_the_attention_and_mlp_linears(family):
    model = tiny_model(family)
    assert type(model).__name__ == CLASSES[family]
    targets = find_targets(model)
    assert {name.rsplit(".", 1)[-1] for name in targets} == FAMILIES[family][1]
    per_layer = 4 if family in ("gpt2", "gpt_neox") else 7  # GPT-2 has c_proj in attention and in the MLP
    assert len(targets) == per_layer * 2
    assert not any("lm_head" in name or "embed" in name for name in targets)


@pytest.mark.parametrize("family", FAMILIES)
def test_target_modules_override_the_default(family):
    model = tiny_model(family)
    pattern = sorted(FAMILIES[family][1])[0]
    assert {name.rsplit(".", 1)[-1] for name in find_targets(model, [pattern])} == {pattern}


@pytest.mark.parametrize("family", FAMILIES)
def test_continued_pretraining_exports_the_same_architecture(family, prepared_data, tmp_path):
    init = tiny_model(family)
    init.save_pretrained(tmp_path / "init")
    cfg = run_config(prepared_data, tmp_path / "run", init_from=str(tmp_path / "init"), warm_start_steps=0,
                     steps=8, reset_every=3, restart_warmup_steps=1, warmup_steps=2, batch_tokens=128,
                     eval_every=0, eval_tokens=128)
    summary = train(cfg, progress=False)
    assert (summary.restarts, summary.merges) == (2, 2)  # at steps 3 and 6

    # The training model as it was at the end: the initial architecture, wrapped, with the last checkpoint.
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "init")
    wrap(trained, cfg.relora_config())
    ckpt.load_weights(trained, ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints"))
    trained.eval()
    last_cycle = max(float(layer.lora_B["default"].weight.detach().abs().max()) for layer in lora_layers(trained))
    assert last_cycle > 0  # the last cycle (steps 6-7) moved B: the export must include it

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert type(exported) is type(init)
    assert not any("lora" in name for name, _ in exported.named_parameters())
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got, before = trained(ids).logits, exported(ids).logits, init.eval()(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - before).abs().max() > 1e-3  # training changed the model

    # A checkpoint of an --init-from run rebuilds its own architecture, not the preset's LLaMA.
    dense = model_from_checkpoint(ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")).eval()
    assert type(dense) is type(init)
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_cli_prepares_with_a_model_tokenizer_and_trains_from_its_directory(prepared_data, tmp_path, capsys):
    """`relora prepare --tokenizer DIR` and `relora train --init-from DIR` on one local HF directory."""
    model_dir = tmp_path / "neox"
    saved_model("gpt_neox", model_dir)
    from relora.data import load_prepared

    load_prepared(prepared_data).tokenizer().save_pretrained(model_dir)  # a local HF tokenizer directory
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):  # a text file is one document
        (corpus / f"doc{i}.txt").write_text("".join(f"def f{j}(x):\n    return x * {j} + {i}\n" for j in range(20)))
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "data"), "--tokenizer", str(model_dir),
                 "--val-fraction", "0.1", "--no-progress"]) == 0
    data = load_prepared(tmp_path / "data")
    assert data.vocab_size == 512 and (data.train < 512).all()

    assert main(["train", "--init-from", str(model_dir), "--data", str(tmp_path / "data"),
                 "--out", str(tmp_path / "run"), "--steps", "6", "--reset-every", "2",
                 "--restart-warmup-steps", "1", "--rank", "4", "--batch-tokens", "64",
                 "--micro-batch", "2", "--seq-len", "32", "--eval-every", "0", "--eval-tokens", "64",
                 "--save-every", "0", "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "restarts     2" in out  # no warm start: restarts at steps 2 and 4
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert type(final).__name__ == "GPTNeoXForCausalLM"
    assert (tmp_path / "run" / "final" / "tokenizer.json").is_file()


def test_seq_len_beyond_learned_positions_is_a_config_error(prepared_data, tmp_path):
    from relora.errors import ConfigError

    saved_model("gpt2", tmp_path / "gpt2")  # 64 learned positions
    cfg = run_config(prepared_data, tmp_path / "run", init_from=str(tmp_path / "gpt2"), warm_start_steps=0,
                     seq_len=128, batch_tokens=512, steps=4, reset_every=2, restart_warmup_steps=1, warmup_steps=1)
    with pytest.raises(ConfigError, match="--seq-len 128 is longer than the 64 positions GPT2LMHeadModel"):
        train(cfg, progress=False)
    saved_model("llama", tmp_path / "llama")  # rotary: no hard limit, so no error at the same length
    from relora.run.build import learned_positions

    assert learned_positions(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama")) is None
