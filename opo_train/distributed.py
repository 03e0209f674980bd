"""Process-group setup: torchrun (NCCL on GPU, gloo on CPU) or a single process.

Without torchrun the trainer still runs the same FSDP2 code on a 1-rank gloo group, so one code
path serves a laptop and many nodes.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    group: object  # the data-parallel process group (the default group)
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(device: str = "auto") -> DistInfo:
    """Join (or make) the default process group and pick this rank's device."""
    want_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError("config key 'device': 'cuda' asked but no CUDA device is available")
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if want_cuda else "gloo"
        if launched:
            dist.init_process_group(backend, device_id=dev if want_cuda else None)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                    rank=0, world_size=1)
        owns = True
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank,
                    device=dev, group=dist.group.WORLD, owns_group=owns)


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few Python numbers over ranks (one collective)."""
    t = torch.tensor(values, dtype=torch.float64)
    if info.device.type == "cuda":
        t = t.to(info.device)
    if info.world > 1:
        dist.all_reduce(t, group=info.group)
    return t.cpu().tolist()


def all_gather_objects(obj, info: DistInfo) -> list:
    if info.world == 1:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj, group=info.group)
    return out
