"""Checkpoints with ``torch.distributed.checkpoint`` that are complete or invisible.

Layout: ``<output_dir>/checkpoints/step_000040/`` holds the DCP shards of model and optimizer
(every rank writes its own shard), ``rng_rank{r}.pt`` (each rank's RNG states),
``trainer_state.json`` (step, data position, counters) and, last, ``COMPLETE``.

A checkpoint is written into ``step_000040.tmp-<nonce>/``; after every rank has finished
(barrier), rank 0 writes ``COMPLETE``, fsyncs, and renames the directory to its final name: the
rename is atomic on one filesystem, so a crash at any moment leaves either the old set of
checkpoints or the new one, never a half-written directory with a final name. The loader only
looks at final names that contain ``COMPLETE``; stale ``.tmp-*`` directories are removed.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

_NAME = re.compile(r"^step_(\d+)$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    root = checkpoint_dir(output_dir)
    if not root.exists():
        return None
    best = None
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / "COMPLETE").exists():
            if best is None or int(m.group(1)) > best[0]:
                best = (int(m.group(1)), p)
    return best[1] if best else None


def save(output_dir, step: int, policy, optimizer, trainer_state: dict, info, keep: int = 2) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    root = checkpoint_dir(output_dir)
    final = root / f"step_{step:06d}"
    nonce = uuid.uuid4().hex[:8] if info.is_main else None
    if info.world > 1:
        box = [nonce]
        dist.broadcast_object_list(box, src=0, group=info.group)
        nonce = box[0]
    tmp = root / f"step_{step:06d}.tmp-{nonce}"
    if info.is_main:
        tmp.mkdir(parents=True, exist_ok=True)
    if info.world > 1:
        dist.barrier(group=info.group)
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{info.rank}.pt")
    if info.world > 1:
        dist.barrier(group=info.group)
    if info.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        with open(tmp / "COMPLETE", "w") as f:
            f.write(f"step {step}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. the final one)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _prune(root, keep)
    if info.world > 1:
        dist.barrier(group=info.group)
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted((int(m.group(1)), p) for p in root.iterdir()
                  if (m := _NAME.match(p.name)) and (p / "COMPLETE").exists())
    for _, p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir():  # leftovers of a crash mid-write
        if ".tmp-" in p.name:
            shutil.rmtree(p, ignore_errors=True)


def load(path: Path, policy, optimizer, info) -> dict:
    """Restore model, optimizer and this rank's RNG from ``path``; returns the trainer state."""
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=True))
    rng_file = path / f"rng_rank{info.rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())
