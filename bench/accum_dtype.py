"""``python -m bench.accum_dtype``: the error of the weight gradient against float64 when the
per-chunk products ``dzᵀ h`` of a bf16 LM head are summed in fp32 (rounded to bf16 once, at the
end) or in bf16 (each chunk's product rounded, then added in bf16).

The GPU headline (N = 8192 tokens, V = 151936, bf16) runs in 4 chunks of 2048 tokens; scaled to
the CPU: N tokens in ``--chunks`` chunks, H = 512, paper-mode OPO on peaked inputs (bench.cases).
dz is the float64 gradient of the loss w.r.t. the logits rounded to bf16 (what the GEMMs read);
each chunk's product is exact in fp32 accumulation (fp32 GEMM of bf16 inputs), so the two
schemes differ only in how the chunks are summed and rounded.
"""
from __future__ import annotations

import argparse

import torch

from .cases import ALPHA, MU, TAU, Shape, make_inputs


def measure(N: int, T: int, H: int, V: int, chunks: int, seed: int = 0) -> dict:
    x = make_inputs(Shape(N // T, T, H, V, "bfloat16"), "peaked", "cpu", seed)
    h = x.hidden.detach().reshape(N, H).double()
    w = x.weight.detach().double()
    z = (h @ w.T).requires_grad_(True)
    logp = torch.log_softmax(z, -1).gather(-1, x.targets.reshape(-1, 1)).squeeze(-1)
    from opo_kernels import opo_loss
    loss, _ = opo_loss(logp.view(N // T, T), x.old_logps.double(), x.advantages,
                       alpha=ALPHA, mu=MU, tau=TAU)
    dz, = torch.autograd.grad(loss, z)
    want = dz.T @ h                                    # float64 truth
    dzb = dz.to(torch.bfloat16).float()
    hb = h.float()                                     # h is bf16-exact
    acc32 = torch.zeros(V, H)
    acc16 = torch.zeros(V, H, dtype=torch.bfloat16)
    for rows in torch.arange(N).chunk(chunks):
        p = dzb[rows].T @ hb[rows]                     # fp32 product of bf16 inputs
        acc32 += p
        acc16 += p.to(torch.bfloat16)
    scale = want.abs().max().item()
    out = {}
    for name, got in (("fp32", acc32.to(torch.bfloat16)), ("bf16", acc16)):
        err = (got.double() - want).abs()
        out[name] = {"max_err_rel": err.max().item() / scale,
                     "rms_err_rel": (err.pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()}
    # the bf16 rounding of the float64 gradient itself: the least either can achieve
    err = (want.to(torch.bfloat16).double() - want).abs()
    out["bf16 of float64"] = {"max_err_rel": err.max().item() / scale,
                              "rms_err_rel": (err.pow(2).mean().sqrt()
                                              / want.pow(2).mean().sqrt()).item()}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.accum_dtype", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--t", type=int, default=256)
    ap.add_argument("--h", type=int, default=512)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--chunks", type=int, default=4)
    a = ap.parse_args(argv)
    res = measure(a.n, a.t, a.h, a.v, a.chunks)
    print(f"N={a.n} ({a.n // a.t}x{a.t}) H={a.h} V={a.v} bf16, {a.chunks} chunks; "
          "dW error against float64 (relative to max|dW| / rms):")
    for k, v in res.items():
        print(f"  {k:16s} max {v['max_err_rel']:.3e}  rms {v['rms_err_rel']:.3e}")


if __name__ == "__main__":
    main()
