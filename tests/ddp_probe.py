"""A torchrun worker for tests/test_distributed.py: trains through stages.steps.train like
`seg train`, and writes what each rank saw to RANK.pt in the folder given first:

- "model": this rank's final weights (DDP keeps the ranks equal when gradients are averaged)
- "rounds": gradient all-reduce rounds (DDP comm-hook calls on a step's last bucket)
- "bn_at_switch": BatchNorm's parameters and buffers when the forward was rebuilt for OS8

    python -m torch.distributed.run --standalone --nproc-per-node 2 ddp_probe.py OUT [-S k=v ...]
"""

import sys
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.engine import distributed
from pipeline.engine import train as train_mod
from stages import steps

out = Path(sys.argv[1])
overrides = [a for a in sys.argv[2:] if a != "-S"]
seen = {"rounds": 0, "model": None, "bn_at_switch": None}


def counting_hook(state, bucket):
    if bucket.is_last():
        seen["rounds"] += 1
    return allreduce_hook(state, bucket)


ddp_init = DDP.__init__


def init(self, *args, **kwargs):
    ddp_init(self, *args, **kwargs)
    self.register_comm_hook(None, counting_hook)


DDP.__init__ = init
build = train_mod.build_forward_loss


def recording_build(model, *args, **kwargs):
    if seen["model"] is not None:  # a rebuild: the OS16 -> OS8 switch
        seen["bn_at_switch"] = {
            f"{name}.{k}": v.detach().clone()
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)
            for k, v in mod.state_dict().items()
        }
    seen["model"] = model
    return build(model, *args, **kwargs)


train_mod.build_forward_loss = recording_build
info = distributed.init_from_env("cpu")
try:
    steps.train(steps.load("params.yaml", overrides), resume=steps.Resume.AUTO)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": seen["model"].state_dict(),
            "parameters": [name for name, _ in seen["model"].named_parameters()],
            "rounds": seen["rounds"],
            "bn_at_switch": seen["bn_at_switch"],
            "world": info.world_size,
        },
        out / f"{info.rank}.pt",
    )
finally:
    distributed.cleanup()
