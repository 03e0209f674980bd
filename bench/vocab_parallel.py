"""Time and memory of the vocabulary-parallel head per shard count, one gloo process per shard.

    python -m bench.vocab_parallel --shards 1,2,4 --V 32000 --H 512 --seqs 4 --seq-len 256

Each rank holds ``V / k`` rows of the head (the last shard takes the remainder) and the same
hidden states; a step is ``fused_opo_loss(..., vocab_parallel=...)`` forward and backward.
Reported per shard count: the median step time of the slowest rank, the bare-GEMM floor of the
local shard (the logits GEMM and the two gradient GEMMs, timed in the same process), and the
peak tensor memory of one step above inputs and gradients (``bench.measure.peak_cpu``), the
largest over the ranks. On a CPU the ranks share its cores (each gets cores / k threads), so the
time measures the overhead of the split (collectives, the two-phase pass) against the local
floor, not a speed-up.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from opo_train.distributed import free_port

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _rows(V, k, r):
    base = V // k
    start = r * base
    return start, (V if r == k - 1 else start + base)


def _worker(rank, k, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=k)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // k))
    from opo_kernels import VocabParallel, fused_opo_loss, linear_logprobs
    from bench.measure import peak_cpu
    try:
        dt = DTYPES[args.dtype]
        g = torch.Generator().manual_seed(0)
        N = args.seqs * args.seq_len
        hidden = torch.randn(N, args.H, generator=g).to(dt)
        weight = (torch.randn(args.V, args.H, generator=g) * args.H ** -0.5).to(dt)
        targets = torch.randint(0, args.V, (N,), generator=g)
        adv = torch.randn(args.seqs, generator=g)
        cu = torch.arange(args.seqs + 1, dtype=torch.int32) * args.seq_len
        s0, s1 = _rows(args.V, k, rank)
        w = weight[s0:s1].clone().requires_grad_()
        h = hidden.clone().requires_grad_()
        vp = VocabParallel(dist.group.WORLD, s0, s1) if k > 1 else None
        kw = dict(cu_seqlens=cu, vocab_parallel=vp, backend=args.backend)
        with torch.no_grad():
            old = linear_logprobs(hidden, w, targets, **kw) + 0.01

        def step():
            loss, _ = fused_opo_loss(h, w, targets, adv, old, **kw)
            loss.backward()

        def zero():
            h.grad = w.grad = None

        def floor():
            z = h.detach() @ w.detach().t()
            z @ w.detach()
            z.t() @ h.detach()

        times, floors = [], []
        for i in range(args.repeats + 1):
            for fn, acc in ((step, times), (floor, floors)):
                zero()
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                dist.barrier()
                if i:  # the first round warms up
                    acc.append(time.perf_counter() - t0)
        grad_bytes = h.numel() * h.element_size() + w.numel() * w.element_size()
        peak = peak_cpu(step, zero, grad_bytes)[0]
        stats = torch.tensor([statistics.median(times), statistics.median(floors), float(peak)],
                             dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        if rank == 0:
            t, f, p = stats.tolist()
            Path(out).write_text(json.dumps({
                "shards": k, "step_ms": t * 1e3, "floor_ms": f * 1e3, "x_floor": t / f,
                "peak_mib": p / 2 ** 20, "rows_per_rank": s1 - s0,
                "comm_floats_per_token": {"forward": 5, "backward": args.H}}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", default="1,2,4")
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--seqs", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--backend", default="auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON path (the .md is written beside it)")
    args = p.parse_args(argv)
    rows = []
    for k in [int(x) for x in args.shards.split(",")]:
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / "r.json"
            mp.start_processes(_worker, args=(k, free_port(), args, str(f)), nprocs=k, join=True,
                               start_method="spawn")
            rows.append(json.loads(f.read_text()))
        print(rows[-1], flush=True)
    shape = {"V": args.V, "H": args.H, "tokens_per_seq": args.seq_len, "seqs": args.seqs,
             "N": args.seqs * args.seq_len, "dtype": args.dtype, "backend": args.backend,
             "cpu_count": os.cpu_count(), "torch": torch.__version__}
    md = [f"Vocabulary-parallel head, CPU, one gloo process per shard: V={args.V}, H={args.H}, "
          f"{args.seqs} sequences × {args.seq_len} tokens (N={args.seqs * args.seq_len}), "
          f"{args.dtype}, backend {args.backend}, {os.cpu_count()} cores shared by the ranks.", "",
          "| shards | rows per rank | step (ms) | local 3-GEMM floor (ms) | × floor | peak above inputs+grads (MiB) |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['shards']} | {r['rows_per_rank']} | {r['step_ms']:.1f} | {r['floor_ms']:.1f} | "
           f"{r['x_floor']:.2f} | {r['peak_mib']:.1f} |" for r in rows]
    text = "\n".join(md) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"date": datetime.date.today().isoformat(), "shape": shape,
                                   "rows": rows}, indent=1) + "\n")
        out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
