"""Run `relora train ARGS...` under torchrun with test probes (used by tests/run/test_distributed.py).

PROBE=checksums: after every merge, gather a checksum of every rank's weights and
have rank 0 append them, one JSON list per merge, to $PROBE_OUT.
PROBE=crash: rank 1 raises in its 5th forward pass.
PROBE=kill_in_merge: SIGKILL itself in the middle of merge number $KILL_AT (a count of merged layers).
PROBE=kill_in_save: SIGKILL itself after writing the weights of checkpoint save number $KILL_AT.
PROBE=rank_rng: seed torch, numpy and python with 1000 + rank first, so every rank draws other dropout masks.
(Also used without torchrun, by tests/test_reliability.py.)
"""

import hashlib
import json
import os
import signal
import sys

import torch
import torch.distributed as dist

import relora.core.adapters
import relora.core.controller
import relora.run.checkpoint
import relora.train
from relora.cli import main

probe = os.environ["PROBE"]
if probe == "checksums":
    merge = relora.core.controller.merge_and_reinit

    def merge_and_checksum(model, seed, **kwargs):
        merged = merge(model, seed, **kwargs)
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

    relora.core.controller.merge_and_reinit = merge_and_checksum
elif probe == "crash":
    loss_fn, calls = relora.train.lm_loss, [0]

    def crashing_loss(model, batch):
        calls[0] += 1
        if dist.get_rank() == 1 and calls[0] == 5:
            raise RuntimeError("injected failure on rank 1")
        return loss_fn(model, batch)

    relora.train.lm_loss = crashing_loss

elif probe in ("kill_in_merge", "kill_in_save"):
    module, name = (relora.core.adapters, "merge_layer") if probe == "kill_in_merge" else (relora.run.checkpoint, "save_model")
    original, calls, kill_at = getattr(module, name), [0], int(os.environ["KILL_AT"])

    def killing(*args, **kwargs):
        result = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(module, name, killing)
elif probe == "rank_rng":
    import random

    import numpy as np

    seed = 1000 + int(os.environ["RANK"])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

sys.exit(main(["train", *sys.argv[1:]]))
