"""bf16 merges with their rounding residual on FSDP2-style row shards == the same merges on one process.

Run under torchrun (gloo, CPU) by tests/core/test_adapters.py. Every rank builds the same layer twice: one whole,
one whose frozen bf16 W is a DTensor sharded by rows. After merges of the same random updates the gathered
sharded W and residual must equal the whole ones bit for bit, and a residual reloaded from its whole
tensor must give each rank back its own slice. Rank 0 prints "ok".
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import relora
from relora.core.adapters import (
    ADAPTER,
    load_merge_residuals,
    lora_layers,
    merge_and_reinit,
    merge_residual,
    merge_residuals,
)

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))


def layer_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48, bias=False))
    return relora.wrap(model, relora.ReLoRAConfig(r=4, reset_every=None, frozen_dtype="bfloat16"))


whole, sharded = layer_model(), layer_model()
base = lora_layers(sharded)[0].get_base_layer()
base.weight = nn.Parameter(distribute_tensor(base.weight.data, mesh, [Shard(0)]), requires_grad=False)
generator = torch.Generator().manual_seed(1)
for k in range(5):
    update = torch.randn(48, 4, generator=generator) * 1e-3
    for model in (whole, sharded):
        with torch.no_grad():
            lora_layers(model)[0].lora_B[ADAPTER].weight.copy_(update)
        merge_and_reinit(model, seed=k)
w_whole = lora_layers(whole)[0].get_base_layer().weight
assert base.weight.to_local().shape[0] < w_whole.shape[0]  # really sharded
assert torch.equal(base.weight.full_tensor(), w_whole)
saved = merge_residuals(sharded)
assert torch.equal(saved["0"], merge_residual(lora_layers(whole)[0])) and saved["0"].abs().max() > 0

fresh = layer_model()
fresh_base = lora_layers(fresh)[0].get_base_layer()
fresh_base.weight = nn.Parameter(distribute_tensor(fresh_base.weight.data, mesh, [Shard(0)]), requires_grad=False)
load_merge_residuals(fresh, saved)
assert torch.equal(merge_residual(lora_layers(fresh)[0]), merge_residual(lora_layers(sharded)[0]))
dist.barrier()
if dist.get_rank() == 0:
    print("ok")
dist.destroy_process_group()
