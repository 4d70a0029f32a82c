"""Run `relora train ARGS...` under torchrun with test probes (used by tests/test_distributed.py).

PROBE=checksums: after every merge, gather a checksum of every rank's weights and
have rank 0 append them, one JSON list per merge, to $PROBE_OUT.
PROBE=crash: rank 1 raises in its 5th forward pass.
"""

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist

import relora.controller
import relora.train
from relora.cli import main

probe = os.environ["PROBE"]
if probe == "checksums":
    merge = relora.controller.merge_and_reinit

    def merge_and_checksum(model, seed):
        merged = merge(model, seed)
        digest = hashlib.sha256()
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        sums = [None] * dist.get_world_size()
        dist.all_gather_object(sums, digest.hexdigest())
        if dist.get_rank() == 0:
            with open(os.environ["PROBE_OUT"], "a") as f:
                f.write(json.dumps(sums) + "\n")
        return merged

    relora.controller.merge_and_reinit = merge_and_checksum
elif probe == "crash":
    loss_fn, calls = relora.train.lm_loss, [0]

    def crashing_loss(model, batch):
        calls[0] += 1
        if dist.get_rank() == 1 and calls[0] == 5:
            raise RuntimeError("injected failure on rank 1")
        return loss_fn(model, batch)

    relora.train.lm_loss = crashing_loss

sys.exit(main(["train", *sys.argv[1:]]))
