"""Cost of the native CPU vocabulary pass against the three LM-head GEMMs it sits between.

    python -m bench.native_vocab                 # N=1024, V=32000, H=512, fp32
    python -m bench.native_vocab --threads 1 --repeats 9

In one process, each timed ``--repeats`` times after ``--warmup`` untimed rounds (medians):
  * the GEMM floor: ``z = h @ W.T``, ``dh = dz @ W``, ``dW = dz.T @ h``;
  * the native pass (:mod:`opo_kernels.native`): ``vocab_forward`` then ``vocab_backward``
    writing dz in place into the logits buffer, as the chunked loss does;
  * the same with the PyTorch pass (:mod:`opo_kernels.vocab_torch`).
The logits buffer is refilled from a saved copy (untimed) before each vocabulary-pass run, since
the in-place backward overwrites it. The candidates are interleaved within each repeat so that
load from other processes on a shared machine affects them alike.

Goal: native forward+backward <= ~3-4% of the GEMM time, so that the whole loss can stay within
~1.05x of the GEMM floor.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024, help="tokens (rows)")
    ap.add_argument("--v", type=int, default=32000, help="vocabulary size")
    ap.add_argument("--h", type=int, default=512, help="hidden size")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--skip-torch", action="store_true", help="do not time the PyTorch pass")
    args = ap.parse_args(argv)

    from opo_kernels import native, vocab_torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ok = native.available()
    setup = time.perf_counter() - t0
    if not ok:
        raise SystemExit("native vocabulary pass unavailable (see the warning above)")

    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    N, V, H = args.n, args.v, args.h
    h = torch.randn(N, H, generator=gen).to(dtype)
    W = (torch.randn(V, H, generator=gen) / H ** 0.5).to(dtype)
    targets = torch.randint(0, V, (N,), generator=gen)
    grad_logp = torch.randn(N, generator=gen)
    z0 = h @ W.T
    z = z0.clone()
    T = args.temperature

    def gemms():
        zz = h @ W.T
        torch.mm(zz, W)  # dh = dz @ W (dz has the logits' shape)
        torch.mm(zz.T, h)  # dW = dz.T @ h

    def refill():
        z.copy_(z0)

    state = {}

    def native_fwd_keep():
        state["f"] = native.vocab_forward(z, targets, T)

    def native_bwd():
        _, lse, ent = state["f"]
        native.vocab_backward(z, targets, lse, ent, grad_logp, None, T, out=z)

    def native_both():
        _, lse, ent = native.vocab_forward(z, targets, T)
        native.vocab_backward(z, targets, lse, ent, grad_logp, None, T, out=z)

    def torch_both():
        _, lse, ent = vocab_torch.vocab_forward(z, targets, T)
        vocab_torch.vocab_backward(z, targets, lse, ent, grad_logp, None, T, out=z)

    # Interleaved: every repeat times each candidate once, so that load from other processes
    # on a shared machine hits all of them alike; the ratio is the median of per-repeat ratios.
    cases = {"gemm": (gemms, None), "native_fwd": (native_fwd_keep, refill),
             "native_bwd": (native_bwd, lambda: (refill(), native_fwd_keep())),
             "native": (native_both, refill)}
    if not args.skip_torch:
        cases["torch"] = (torch_both, refill)
    samples = {k: [] for k in cases}
    for i in range(args.warmup + args.repeats):
        for name, (fn, before) in cases.items():
            if name == "torch" and i % 2:  # the slow one: every other repeat is enough
                continue
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            if i >= args.warmup:
                samples[name].append(time.perf_counter() - t0)
    res = {k: statistics.median(v) for k, v in samples.items() if v}
    ratio = statistics.median(n / g for n, g in zip(samples["native"], samples["gemm"]))
    spread = (min(samples["gemm"]) * 1e3, max(samples["gemm"]) * 1e3)

    ms = {k: v * 1e3 for k, v in res.items()}
    gemm = res["gemm"]
    build = native._state.get("build_seconds")
    print(f"N={N} V={V} H={H} {args.dtype} threads={torch.get_num_threads()} "
          f"torch {torch.__version__}; native setup {setup:.2f} s"
          + (f" (built in {build:.1f} s)" if build is not None else " (cached build)"))
    print(f"three GEMMs                    {ms['gemm']:9.2f} ms (samples {spread[0]:.1f} .. {spread[1]:.1f})")
    print(f"native forward                 {ms['native_fwd']:9.2f} ms")
    print(f"native backward (in place)     {ms['native_bwd']:9.2f} ms")
    print(f"native forward+backward        {ms['native']:9.2f} ms = {ratio:6.2%} of the GEMMs "
          "(median of per-repeat ratios)")
    if "torch" in res:
        print(f"torch  forward+backward        {ms['torch']:9.2f} ms = {res['torch'] / gemm:6.2%} of the GEMMs"
              f"  (native is {res['torch'] / res['native']:.1f}x faster)")
    print(f"GEMMs + native pass / GEMMs    {1 + ratio:9.3f}x")
    res["ratio"] = ratio
    return res


if __name__ == "__main__":
    main()
