"""Shared fixtures: tiny models built from configs, CPU only, seeds fixed."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


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
