"""``python -m bench``: time and peak memory of OPO losses against baselines and the GEMM floor.

Examples::

    python -m bench --device cpu                       # CPU headline (peaked + flat) + N/V sweeps
    python -m bench --device cpu --sweep none          # headline only
    python -m bench --device cuda --preset gpu-headline
    python -m bench --quick                            # small shapes, a smoke run
    python -m bench --device cpu --inputs none --sweep t   # tokens per sequence T

Writes ``<out>/<date>-<device>[-<tag>].json`` (raw numbers, versions, command), ``.md`` beside it
(tables) and ``-sweep-n.png`` / ``-sweep-v.png`` (time and memory against N and V).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from . import measure, report
from .cases import (METHOD_NAMES, METHODS, PRESETS, SWEEPS, Shape, Unavailable, make_inputs,
                    sweep_shapes)

def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("triton", "liger-kernel", "cut-cross-entropy", "opo", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _load():
    """1-minute load average (CPU timings on a shared machine are only as good as this)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _device_name(device: str) -> tuple[str, str]:
    """(human name, short file-name tag)."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        m = re.search(r"(H100|H200|A100|L40S?|L4|A10G?|B200|GH200|RTX ?\d+)", name)
        return name, "cuda-" + (m.group(1).replace(" ", "").lower() if m else "gpu")
    model = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {torch.get_num_threads()} threads", "cpu"


def _error(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"error: {type(e).__name__}: {msg}"


def run_case(shape: Shape, kind: str, device: str, methods, repeats: int, seed: int,
             group: str, log) -> dict:
    """Build, warm up, time and memory-probe every method on one fresh set of inputs.

    CPU timing is round-robin: each of ``repeats`` rounds runs every method once, so that load
    from other processes on a shared machine lands on all methods alike; the median per method
    is kept. CUDA timing is ``do_bench`` per method, one method in memory at a time.
    """
    x = make_inputs(shape, kind, device, seed)
    case = {"group": group, "label": shape.label(), "inputs": kind, "B": shape.B, "T": shape.T,
            "N": shape.N, "H": shape.H, "V": shape.V, "dtype": shape.dtype,
            "entropy": x.entropy, "log_V": math.log(shape.V), "target_logp": x.target_logp,
            "logit_scale": x.logit_scale, "methods": []}
    log(f"\n== {group}: {shape.label()}, {kind} inputs: mean entropy {x.entropy:.2f} nats "
        f"(log V {math.log(shape.V):.2f})")
    grads = [x.hidden, x.weight]

    def mem(step):
        probe = measure.peak_cuda if device == "cuda" else measure.peak_cpu
        return probe(step, x.zero_grad, x.grad_bytes())

    def release():
        x.zero_grad()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    ready = []  # (row, step) of the methods that built and ran once
    for m in methods:
        row = {"name": m.name, "description": m.description, "status": "ok"}
        case["methods"].append(row)
        if device not in m.devices:
            row["status"] = f"n/a on {device}: {m.why_not}"
            continue
        step = None
        try:
            step = m.build(x)
            x.zero_grad()
            loss = step()  # first call: compile / JIT-build / autotune; counts as warm-up
            row["loss"] = None if loss is None else float(loss)
            if device == "cuda":
                row["time_s"], row["samples_s"] = measure.time_cuda(step, grads, m.warmup - 1,
                                                                    repeats)
                row["peak_bytes"], row["held_after_bytes"], row["peak_raw_bytes"] = mem(step)
            else:
                for _ in range(m.warmup - 1):
                    x.zero_grad()
                    step()
                ready.append((row, step))
        except Unavailable as e:
            row["status"] = f"not available: {e}"
        except Exception as e:  # reported, never dropped: an OOM or a bug is a result too
            row["status"] = _error(e)
        finally:
            if device == "cuda":
                step = None
            release()

    if device == "cpu":
        for row, _ in ready:
            row["samples_s"] = []
        for _ in range(repeats):
            for row, step in ready:
                if row["status"] != "ok":
                    continue
                x.zero_grad()
                try:
                    t0 = time.perf_counter()
                    step()
                    row["samples_s"].append(time.perf_counter() - t0)
                except Exception as e:
                    row["status"] = _error(e)
        for row, step in ready:
            if row["status"] != "ok":
                continue
            row["time_s"] = statistics.median(row["samples_s"])
            try:
                row["peak_bytes"], row["held_after_bytes"], row["peak_raw_bytes"] = mem(step)
            except Exception as e:
                row["status"] = "memory probe " + _error(e)
        ready.clear()
        release()

    report.derive_case(case)
    for r in case["methods"]:
        if r["status"] != "ok":
            log(f"  {r['name']:20s} {r['status']}")
            continue
        xf = r.get("x_floor")
        log(f"  {r['name']:20s} {r['time_s'] * 1e3:9.1f} ms "
            + ("" if xf is None else f"{xf:6.2f}x floor ")
            + f"peak {r['peak_bytes'] / 2**20:9.1f} MiB  loss {r['loss']}")
    return case


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="headline shape (default: <device>-headline; <device>-quick with "
                        "--quick)")
    p.add_argument("--quick", action="store_true",
                   help="small shapes and 3 timed runs: a smoke run, not numbers to quote")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="default: the preset's (cpu fp32, gpu bf16)")
    p.add_argument("--shape", help="B,T,H,V overriding the preset's headline shape")
    p.add_argument("--n", type=int, help="tokens N (a multiple of T; B = N / T)")
    p.add_argument("--t", type=int, help="tokens per sequence T")
    p.add_argument("--h", type=int, help="hidden size H")
    p.add_argument("--v", type=int, help="vocabulary size V")
    p.add_argument("--sweep", choices=("none", "n", "v", "both", "t"), default="both",
                   help="sweeps over N and/or V around the headline shape (peaked inputs); t: "
                        "over the tokens per sequence T (B = N / T, at least 1)")
    p.add_argument("--sweep-n", help="comma list of N for the N sweep")
    p.add_argument("--sweep-v", help="comma list of V for the V sweep")
    p.add_argument("--sweep-t", help="comma list of T for the T sweep (run at each V of "
                                     "--sweep-v when given)")
    p.add_argument("--inputs", choices=("peaked", "zipf", "flat", "both", "all", "none"),
                   default="both", help="inputs for the headline shape (both: peaked and flat; "
                   "all: also zipf; none: sweeps only); sweeps use peaked")
    p.add_argument("--methods", help=f"comma list out of {','.join(METHOD_NAMES)} "
                                     "(default: all; the floor always runs)")
    p.add_argument("--warmup", type=int, default=None, help="extra warm-up runs (CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per method (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results", help="output folder")
    p.add_argument("--tag", default="", help="appended to the output file names")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    return p.parse_args(argv)


def headline_shape(args) -> tuple[Shape, str]:
    preset = args.preset or f"{'gpu' if args.device == 'cuda' else 'cpu'}-" \
                            f"{'quick' if args.quick else 'headline'}"
    s = PRESETS[preset]
    B, T, H, V, dtype = s.B, s.T, s.H, s.V, s.dtype
    if args.shape:
        try:
            B, T, H, V = (int(v) for v in args.shape.split(","))
        except ValueError:
            raise SystemExit(f"--shape must be B,T,H,V, got {args.shape!r}")
    if args.t:
        B, T = max(1, B * T // args.t), args.t
    if args.n:
        if args.n % T:
            raise SystemExit(f"--n {args.n} is not a multiple of T={T} (set --t)")
        B = args.n // T
    H, V = args.h or H, args.v or V
    return Shape(B, T, H, V, args.dtype or dtype), preset


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    base, preset = headline_shape(args)
    methods = METHODS
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in wanted if m not in METHOD_NAMES]
        if bad:
            raise SystemExit(f"--methods: unknown {bad}; known: {METHOD_NAMES}")
        methods = [m for m in METHODS if m.name in wanted or m.name == "gemm_floor"]
    repeats = args.repeats or (3 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else 1
    if warmup != 1:
        methods = [dataclasses.replace(m, warmup=max(m.warmup, warmup)) for m in methods]

    name, dev_tag = _device_name(args.device)
    now = datetime.datetime.now()
    meta = {
        "date": now.strftime("%Y-%m-%d %H:%M"), "device": args.device, "device_name": name,
        "threads": torch.get_num_threads() if args.device == "cpu" else None,
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in
                                                  (sys.argv[1:] if argv is None else argv)),
        "versions": _versions(), "preset": preset, "headline": base.label(),
        "timing": ("triton.testing.do_bench median" if args.device == "cuda" else
                   f"median of {repeats} round-robin rounds (every method once per round) "
                   "after warm-up, one process"),
        "memory": ("torch.cuda.max_memory_allocated" if args.device == "cuda" else
                   "torch.profiler profile_memory: max running sum of CPU allocator events"),
    }
    meta["load_avg_start"] = _load()
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"{name}; {meta['command']}")

    cases = []
    kinds = {"both": ("peaked", "flat"), "all": ("peaked", "zipf", "flat"),
             "none": ()}.get(args.inputs, (args.inputs,))
    for kind in kinds:
        cases.append(run_case(base, kind, args.device, methods, repeats, args.seed,
                              "headline", log))
    sweeps = SWEEPS.get(preset, {})
    for axis in ("n", "v", "t"):
        if args.sweep not in (axis, "both") or (axis == "t" and args.sweep != "t"):
            continue
        given = getattr(args, f"sweep_{axis}")
        points = [int(v) for v in given.split(",")] if given else sweeps.get(axis)
        if not points:
            continue
        shapes = sweep_shapes(base, axis, points)
        if axis == "t" and args.sweep_v:  # a T sweep at each V of --sweep-v
            shapes = [dataclasses.replace(s, V=int(v)) for v in args.sweep_v.split(",")
                      for s in shapes]
        for shape in shapes:
            cases.append(run_case(shape, "peaked", args.device, methods, repeats,
                                  args.seed, f"sweep-{axis}", log))
    meta["load_avg_end"] = _load()
    run = {"meta": meta, "cases": cases, "targets": report.targets(cases, args.device)}
    stem = now.strftime("%Y-%m-%d") + f"-{dev_tag}" + (f"-{args.tag}" if args.tag else "")
    paths = report.write(run, Path(args.out), stem)
    log("\n" + report.markdown(run))
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return run


if __name__ == "__main__":
    main()
