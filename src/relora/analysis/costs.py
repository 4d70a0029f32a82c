"""The physical limit: FLOPs and state bytes of full-rank vs ReLoRA training, computed from the architecture.

Per token, a trained dense linear map costs 6 d_in d_out FLOPs (forward 2,
input gradient 2, weight gradient 2). A frozen one with a rank-r adapter skips
the weight gradient: 4 d_in d_out + 6 r (d_in + d_out). Attention scores and
the head cost the same in both methods. The ratio of the two totals is the
best throughput ReLoRA can reach relative to full-rank training; the ratio of
the bytes held in weights, gradients and Adam moments is the best memory ratio
(frozen weights in their storage dtype, trainable ones in float32 with float32
gradients and two float32 moments). Activations are the same in both methods
(the adapters add r values per token per wrapped map) and are left out of the
state bound; ``peak_bytes`` adds them (counted per token from the
architecture) for a predicted peak, which the benchmark compares with the
measured one.

Attention is counted as ``FlopCounterMode`` counts the eager implementation
(full T x T scores, no causal saving): 4 T h forward per token per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig

from relora.integrations.quantize import frozen_bytes_per_weight
from relora.models import decoder_linear_shapes, embedding_head_norm_parameters

ADAM_STATE_FACTOR = 2  # exp_avg and exp_avg_sq


@dataclass(frozen=True)
class CostModel:
    """Costs of training one LLaMA architecture at a sequence length and adapter rank."""

    config: LlamaConfig
    seq_len: int
    rank: int
    frozen_bytes: int = 4  # bytes per frozen base weight: 4 float32, 2 bfloat16
    # quantized frozen weights: "int8" (1 byte + a float32 scale per row) or "nf4" (half a byte + a float32
    # absmax per block of 64); None = frozen_bytes each
    quantize: str | None = None
    param_bytes: int = 4  # trainable parameters, their gradients and Adam moments: float32

    @property
    def layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def linear_shapes(self) -> list[tuple[int, int]]:
        """(d_in, d_out) of the wrapped maps of one layer: q, k, v, o, gate, up, down."""
        return [(i, o) for i, o, _ in decoder_linear_shapes(self.config)]

    # ---------------------------------------------------------------- parameters
    @property
    def wrapped_params(self) -> int:
        """Weights of the maps ReLoRA wraps (frozen under ReLoRA)."""
        return self.layers * sum(i * o for i, o in self.linear_shapes)

    @property
    def bias_params(self) -> int:
        return self.layers * sum(o for i, o, bias in decoder_linear_shapes(self.config) if bias)

    @property
    def other_params(self) -> int:
        """Embeddings, head, norms, biases: trained at full rank by every method."""
        return embedding_head_norm_parameters(self.config) + self.bias_params

    @property
    def adapter_params(self) -> int:
        return self.layers * sum(self.rank * (i + o) for i, o in self.linear_shapes)

    def total_params(self, method: str) -> int:
        return self.wrapped_params + self.other_params + (self.adapter_params if method == "relora" else 0)

    def trainable_params(self, method: str) -> int:
        return self.other_params + (self.adapter_params if method == "relora" else self.wrapped_params)

    # ---------------------------------------------------------------- FLOPs
    def flops_per_token(self, method: str) -> int:
        """Training FLOPs per token (forward + backward) of ``method`` (``full`` or ``relora``)."""
        _check(method)
        if method == "full":
            linear = sum(6 * i * o for i, o in self.linear_shapes)
        else:
            linear = sum(4 * i * o + 6 * self.rank * (i + o) for i, o in self.linear_shapes)
        h, vocab = self.config.hidden_size, self.config.vocab_size
        head_dim = getattr(self.config, "head_dim", None) or h // self.config.num_attention_heads
        attention = 3 * 4 * self.seq_len * self.config.num_attention_heads * head_dim  # QK^T and AV, fwd + bwd
        return self.layers * (linear + attention) + 6 * h * vocab

    @property
    def throughput_bound(self) -> float:
        """Best possible tokens/s of ReLoRA over full-rank: the FLOP ratio."""
        return self.flops_per_token("full") / self.flops_per_token("relora")

    # ---------------------------------------------------------------- memory
    def state_bytes(self, method: str) -> dict[str, int]:
        """Bytes of weights, gradients and optimizer state of ``method``."""
        _check(method)
        trainable = self.trainable_params(method)
        frozen = self.frozen_weight_bytes if method == "relora" else 0
        weights = trainable * self.param_bytes + frozen
        grads = trainable * self.param_bytes
        optimizer = ADAM_STATE_FACTOR * trainable * self.param_bytes
        return {"weights": weights, "grads": grads, "optimizer": optimizer, "total": weights + grads + optimizer}

    @property
    def frozen_weight_bytes(self) -> int:
        """Bytes of ReLoRA's frozen weights in their storage format, scales included."""
        per_layer = sum(i * o * frozen_bytes_per_weight(self.quantize, i, dtype_bytes=self.frozen_bytes)
                        for i, o in self.linear_shapes)
        return round(self.layers * per_layer)

    @property
    def memory_bound(self) -> float:
        """Best possible memory of ReLoRA over full-rank (state only, activations excluded)."""
        return self.state_bytes("relora")["total"] / self.state_bytes("full")["total"]

    # ---------------------------------------------------------------- peak memory, activations included
    def activation_floats_per_token(self, method: str, checkpointing: bool = False) -> int:
        """Values autograd saves for the backward pass, per token (transformers' LLaMA, SDPA attention).

        Per layer: six hidden-width tensors around the two RMSNorms and the
        residual adds (plus one rsqrt per norm), q and the attention output
        (2 x q width), k and v (2 x kv width),
        the MLP's gate, up, SiLU(gate) and product (4 x intermediate), SDPA's
        log-sum-exp (one per head); each adapter adds its r-wide A x. Once per
        model: logits' log-softmax (vocab), final norm and head input (3h), RoPE
        cos/sin (2 x head dim) and a few scalars. Checked against autograd's
        saved-tensor hooks in tests/analysis/test_costs.py. With activation
        ``checkpointing`` each block keeps only its input (h), and one block at
        a time holds its full set while it is recomputed.
        """
        _check(method)
        c, h = self.config, self.config.hidden_size
        head_dim = getattr(c, "head_dim", None) or h // c.num_attention_heads
        q = c.num_attention_heads * head_dim
        kv = (c.num_key_value_heads or c.num_attention_heads) * head_dim
        per_layer = 6 * h + 2 * q + 2 * kv + 4 * c.intermediate_size + c.num_attention_heads + 2
        if method == "relora":
            per_layer += len(self.linear_shapes) * self.rank
        layers = (h * self.layers + per_layer) if checkpointing else self.layers * per_layer
        return layers + c.vocab_size + 3 * h + 2 * head_dim + 5

    def peak_bytes(self, method: str, micro_batch: int, activation_bytes: int = 4,
                   checkpointing: bool = False) -> dict[str, int]:
        """Predicted peak memory of one training step, and the two moments that compete for it.

        ``backward``: weights + Adam moments + every saved activation + the
        logits' gradient (two vocab-wide tensors), at the start of the backward
        pass (gradients were freed by ``zero_grad(set_to_none=True)``).
        ``optimizer``: weights + gradients + Adam moments + the AdamW update's
        two temporaries the size of the largest trainable tensor (the
        embedding; torch's single-tensor AdamW, the CPU default). As the backward
        pass frees activations it creates gradients, so the peak is the larger.
        """
        state = self.state_bytes(method)
        tokens = micro_batch * self.seq_len
        activations = tokens * self.activation_floats_per_token(method, checkpointing) * activation_bytes
        logits_grad = 2 * tokens * self.config.vocab_size * 4
        largest = self.config.vocab_size * self.config.hidden_size * self.param_bytes
        backward = state["weights"] + state["optimizer"] + activations + logits_grad
        optimizer = state["total"] + 2 * largest
        return {"activations": activations, "backward": backward, "optimizer": optimizer,
                "peak": max(backward, optimizer)}

    def memory_predicted(self, micro_batch: int, activation_bytes: int = 4, checkpointing: bool = False) -> float:
        """Predicted peak memory of ReLoRA over full-rank at this micro-batch, activations included."""
        return (self.peak_bytes("relora", micro_batch, activation_bytes, checkpointing)["peak"]
                / self.peak_bytes("full", micro_batch, activation_bytes, checkpointing)["peak"])

    def to_dict(self) -> dict:
        return {
            "seq_len": self.seq_len,
            "rank": self.rank,
            "frozen_bytes": self.frozen_bytes,
            "quantize": self.quantize,
            "frozen_weight_bytes": self.frozen_weight_bytes,
            "params": {m: {"total": self.total_params(m), "trainable": self.trainable_params(m)} for m in METHODS},
            "flops_per_token": {m: self.flops_per_token(m) for m in METHODS},
            "state_bytes": {m: self.state_bytes(m) for m in METHODS},
            "throughput_bound": self.throughput_bound,
            "memory_bound": self.memory_bound,
        }

    def explain(self) -> str:
        """A few lines a user can read: where the bounds come from."""
        lines = [
            f"per token, training FLOPs: full {self.flops_per_token('full') / 1e6:,.1f} M, "
            f"relora {self.flops_per_token('relora') / 1e6:,.1f} M "
            f"(frozen maps: 4 d_in d_out + 6 r (d_in + d_out) instead of 6 d_in d_out)",
            f"  -> throughput bound relora / full = {self.throughput_bound:.3f}",
        ]
        for m in METHODS:
            b = self.state_bytes(m)
            lines.append(
                f"{m:>6}: {self.trainable_params(m) / 1e6:,.1f} M trainable of {self.total_params(m) / 1e6:,.1f} M; "
                f"weights {_mib(b['weights'])}, grads {_mib(b['grads'])}, Adam {_mib(b['optimizer'])} "
                f"= {_mib(b['total'])}"
            )
        lines.append(f"  -> memory bound relora / full = {self.memory_bound:.3f} (frozen weights at "
                     f"{self.frozen_bytes} bytes; activations excluded)")
        return "\n".join(lines)


METHODS = ("full", "relora")


def _check(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"the cost model knows {', '.join(METHODS)}, not {method!r}")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"

