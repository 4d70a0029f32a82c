"""The storage-backend interface: the core reaches base layers stored in a format of their own only through it."""

import pytest
import torch
from torch import nn

import relora
from relora.core import frozen_storage
from relora.core.adapters import ADAPTER, decay_frozen_, lora_layers


class Stored(nn.Linear):
    """A base layer 'stored' by the toy backend below: a float Linear the core must not touch directly."""


class ToyBackend:
    """Records what the core asks of it; its layers keep a float weight, so that the results can be checked."""

    def __init__(self) -> None:
        self.merged: list[torch.Tensor] = []
        self.scaled: list[float] = []

    def backend(self) -> frozen_storage.StorageBackend:
        return frozen_storage.StorageBackend(
            name="toy", formats=("toy",), owns=lambda m: isinstance(m, Stored), convert=None, injecting=None,
            dense_weight=lambda base: base.weight.detach().float().clone(),
            merge_=lambda base, delta: self.merged.append(delta.clone()),
            scale_=lambda base, factor: self.scaled.append(factor),
            to_dense=self.to_dense, numel=lambda p: 1000 if getattr(p, "toy", False) else None)

    @staticmethod
    def to_dense(base: nn.Module, weight: torch.Tensor) -> nn.Module:
        linear = nn.Linear(base.in_features, base.out_features, bias=False)
        linear.weight = nn.Parameter(weight)
        return linear


@pytest.fixture
def toy(monkeypatch):
    """A wrapped tiny model whose first layer's base is ``Stored``, and the registered toy backend."""
    wrap = relora.wrap  # first, so that the real backends register themselves in the real registry
    monkeypatch.setattr(frozen_storage, "_BACKENDS", dict(frozen_storage._BACKENDS))  # the toy: this test only
    toy = ToyBackend()
    frozen_storage.register(toy.backend())
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, 3, bias=False))
    wrap(model, relora.ReLoRAConfig(r=2, alpha=4, reset_every=None))
    layer = lora_layers(model)[0]
    stored = Stored(6, 5, bias=False)
    stored.weight = layer.base_layer.weight
    layer.base_layer = stored
    with torch.no_grad():
        layer.lora_B[ADAPTER].weight.fill_(0.5)
    return toy, model, layer


def test_merges_of_a_stored_layer_go_to_its_backend(toy):
    backend, model, layer = toy
    before = layer.base_layer.weight.detach().clone()
    delta = 2.0 * layer.lora_B[ADAPTER].weight.detach() @ layer.lora_A[ADAPTER].weight.detach()
    assert relora.merge_and_reinit(model, seed=1) == 2
    assert len(backend.merged) == 1  # the plain float layer merged itself
    torch.testing.assert_close(backend.merged[0], delta)
    assert torch.equal(layer.base_layer.weight, before)  # the core wrote nothing into the stored weight


def test_weight_decay_of_a_stored_layer_goes_to_its_backend(toy):
    backend, model, _ = toy
    decay_frozen_(model, 0.99)
    assert backend.scaled == [0.99]


def test_unwrap_asks_the_backend_for_a_dense_layer_holding_the_float32_sum(toy):
    _, model, layer = toy
    expected = layer.base_layer.weight.detach() + 2.0 * (layer.lora_B[ADAPTER].weight @ layer.lora_A[ADAPTER].weight)
    relora.unwrap(model)
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(model[0].weight.detach(), expected.detach())


def test_logical_numel_asks_the_backends_then_counts_entries(toy):
    packed = torch.zeros(4)
    packed.toy = True
    assert frozen_storage.logical_numel(packed) == 1000
    assert frozen_storage.logical_numel(torch.zeros(4)) == 4


def test_a_format_without_a_registered_backend_names_what_to_import(monkeypatch):
    monkeypatch.setattr(frozen_storage, "_BACKENDS", {})
    with pytest.raises(RuntimeError, match="import relora.integrations.quantize"):
        frozen_storage.backend_for("nf4")
