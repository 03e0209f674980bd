"""Process-group setup: torchrun (NCCL on GPU, gloo on CPU) or a single process.

Without torchrun the trainer still runs the same FSDP2 code on a 1-rank gloo group, so one code
path serves a laptop and many nodes.

With ``tensor_parallel_size`` k > 1 the processes form a 2-D (data, tensor) mesh of
``world / k`` x k: consecutive ranks make one tensor-parallel group (they hold the same data and
split the loss head's vocabulary), and the ranks at the same place of every group make a
data-parallel group. :class:`DistInfo`'s ``rank`` / ``world`` / ``group`` are the data-parallel
ones (what the data, ω and the global counts are split over); ``global_rank`` / ``procs`` count
every process.
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
    rank: int      # in the data-parallel group
    world: int     # data-parallel ranks (processes / tensor_parallel_size)
    local_rank: int
    device: torch.device
    group: object  # the data-parallel process group (the default group when tp_size is 1)
    owns_group: bool
    global_rank: int = 0
    procs: int = 1           # every process (world x tp_size)
    tp_rank: int = 0         # in the tensor-parallel group
    tp_size: int = 1
    tp_group: object = None  # the tensor-parallel process group (None when tp_size is 1)
    mesh: object = None      # the (dp, tp) DeviceMesh (None when tp_size is 1)

    @property
    def is_main(self) -> bool:
        return self.global_rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(device: str = "auto", tensor_parallel_size: int = 1) -> DistInfo:
    """Join (or make) the default process group and pick this rank's device; with
    ``tensor_parallel_size`` k > 1, split the processes into a (world / k, k) mesh."""
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
    rank, procs = dist.get_rank(), dist.get_world_size()
    tp = tensor_parallel_size
    if tp == 1:
        return DistInfo(rank=rank, world=procs, local_rank=local_rank, device=dev,
                        group=dist.group.WORLD, owns_group=owns, global_rank=rank, procs=procs)
    if tp < 1 or procs % tp:
        if owns:
            dist.destroy_process_group()
        raise ConfigError(f"config key 'tensor_parallel_size': must divide the number of processes "
                          f"({procs}), got {tp}")
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(dev.type, (procs // tp, tp), mesh_dim_names=("dp", "tp"))
    return DistInfo(rank=mesh.get_local_rank("dp"), world=procs // tp, local_rank=local_rank,
                    device=dev, group=mesh.get_group("dp"), owns_group=owns, global_rank=rank,
                    procs=procs, tp_rank=mesh.get_local_rank("tp"), tp_size=tp,
                    tp_group=mesh.get_group("tp"), mesh=mesh)


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], info: DistInfo, every_process: bool = False) -> list[float]:
    """Sum a few Python numbers over the data-parallel ranks (``every_process``: over every
    process) in one collective."""
    t = torch.tensor(values, dtype=torch.float64)
    if info.device.type == "cuda":
        t = t.to(info.device)
    if (info.procs if every_process else info.world) > 1:
        dist.all_reduce(t, group=None if every_process else info.group)
    return t.cpu().tolist()


def all_gather_objects(obj, info: DistInfo, every_process: bool = False) -> list:
    """``obj`` of every data-parallel rank (``every_process``: of every process), in rank order."""
    n = info.procs if every_process else info.world
    if n == 1:
        return [obj]
    out = [None] * n
    dist.all_gather_object(out, obj, group=None if every_process else info.group)
    return out
