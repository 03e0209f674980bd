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
import logging
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
log = logging.getLogger("opo_train")

# What a run writes into its output_dir (other files there are the user's and never touched).
RUN_OUTPUTS = ("checkpoints", "hf_model", "metrics.jsonl", "sft_metrics.jsonl", "metrics.png", "tb",
               "reference_model.pt",
               "config.yaml", "completions.jsonl")


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


def complete(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, newest first."""
    root = checkpoint_dir(output_dir)
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / "COMPLETE").exists()]
    return [p for _, p in sorted(found, reverse=True)]


def latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete(output_dir)
    return found[0] if found else None


def step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def existing_run(output_dir: str | Path) -> str | None:
    """What shows that ``output_dir`` already holds a run (None: nothing)."""
    d = Path(output_dir)
    root = checkpoint_dir(d)
    if root.exists():
        steps = sorted(p.name for p in root.iterdir() if _NAME.match(p.name))
        if steps:
            return f"checkpoints/{steps[-1]}"
    for name in ("metrics.jsonl", "hf_model"):
        if (d / name).exists():
            return name
    return None


def remove_run(output_dir: str | Path) -> None:
    """Delete what a run wrote into ``output_dir`` (only the trainer's own outputs)."""
    d = Path(output_dir)
    for name in RUN_OUTPUTS:
        p = d / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def save(output_dir, step: int, policy, optimizer, trainer_state: dict, info, keep: int = 2) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    root = checkpoint_dir(output_dir)
    final = root / f"step_{step:06d}"
    nonce = uuid.uuid4().hex[:8] if info.is_main else None
    if info.procs > 1:  # every process writes its shards (tensor-parallel ranks included)
        box = [nonce]
        dist.broadcast_object_list(box, src=0)
        nonce = box[0]
    tmp = root / f"step_{step:06d}.tmp-{nonce}"
    if info.is_main:
        tmp.mkdir(parents=True, exist_ok=True)
    if info.procs > 1:
        dist.barrier()
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{info.global_rank}.pt")
    if info.procs > 1:
        dist.barrier()
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
    if info.procs > 1:
        dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted((int(m.group(1)), p) for p in root.iterdir()
                  if (m := _NAME.match(p.name)) and (p / "COMPLETE").exists())
    for _, p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir():  # leftovers of a crash mid-write
        if ".tmp-" in p.name:
            shutil.rmtree(p, ignore_errors=True)


def load_latest(output_dir, policy, optimizer, info) -> tuple[Path | None, dict | None]:
    """Restore the newest checkpoint that loads; a complete-looking one that does not (a
    truncated shard, unreadable state) is renamed ``<name>.corrupt`` with a warning naming it,
    and the previous one is tried. Collective: every rank agrees on the outcome of each try."""
    for path in complete(output_dir):
        err = None
        try:
            state = load(path, policy, optimizer, info)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            err, state = e, None
        ok = [err is None]
        if info.procs > 1:
            box = [None] * info.procs
            dist.all_gather_object(box, ok[0])
            ok = box
        if all(ok):
            return path, state
        if info.is_main:
            lines = [x.strip() for x in str(err).splitlines() if x.strip()] if err else []
            why = (f"{type(err).__name__}: {' ... '.join(dict.fromkeys([lines[0], lines[-1]]))[:300]}"
                   if lines else type(err).__name__ if err else "another rank failed")
            bad = path.with_name(path.name + ".corrupt")
            log.warning("checkpoint %s is corrupt (%s); it is kept as %s and the previous "
                        "checkpoint is used", path, why, bad.name)
            if bad.exists():
                shutil.rmtree(bad)
            os.rename(path, bad)
        if info.procs > 1:
            dist.barrier()
    return None, None


def load(path: Path, policy, optimizer, info) -> dict:
    """Restore model, optimizer and this rank's RNG from ``path``; returns the trainer state."""
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    rng_file = path / f"rng_rank{info.global_rank}.pt"
    rng = torch.load(rng_file, weights_only=False) if rng_file.exists() else None
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=True))
    if rng is not None:
        set_rng_state(rng)
    return trainer_state
