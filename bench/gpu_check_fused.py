"""GPU check of the fused GEMM + vocabulary-pass kernels (opo_kernels.fused_linear).

Usage: python bench/gpu_check_fused.py OUT.json [--n 8192 --h 4096 --v 151936] [--sweep]
       python bench/gpu_check_fused.py --report OUT.json     # the markdown tables of a run

At the GPU headline shape (bf16, N = 8192, H = 4096, V = 151936) this times, with
``triton.testing.do_bench`` (median, ms):

* the bare three-GEMM floor of one LM-head training step: ``z = h @ W.T``, ``dh = dz @ W``,
  ``dW = dz.T @ h`` (torch, bf16), once on random data and once per input kind on that input's
  real dz (bf16 softmax gradient);
* the fused forward + backward (``fused_linear_forward`` + ``fused_linear_backward`` with a
  log-prob gradient only, as OPO/GRPO use it): exact (the default: dz in bounded waves, then
  dense GEMMs), exact with bf16 dweight accumulation (``accum_fp32=False``, no fp32 V x H
  buffer), and filtered (``filter_eps = FILTER_EPS``, with the fraction of tiles it skips), on
  the benchmark's peaked, zipf (a Zipf-like prior shared by all rows) and flat inputs
  (bench.cases.make_inputs);

and reports each time as a ratio to the floor, the peak memory above inputs and gradients
(``torch.cuda.max_memory_allocated``), the relative error (Frobenius) of logp, dhidden, dweight
against an fp32 chunked PyTorch reference (no tf32), bitwise reruns of the backward and of the
forward, and batch invariance of the forward. ``--sweep`` also times forward / backward tile
configurations, wave sizes, forward splits and two other thresholds. Everything goes to the JSON;
a failing measurement is recorded as an error string and the rest still runs.

Without CUDA it runs the same code at a tiny shape under TRITON_INTERPRET=1 (a smoke test of this
script only; its timings mean nothing). Register and spill counts: ``python -m bench.compile_check``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import triton  # noqa: E402
import triton.testing  # noqa: E402

from opo_kernels import fused_linear as fl  # noqa: E402

FILTER_EPS = 2.0 ** -8  # the filtered variant's threshold (per-row dropped mass <= eps * scale)

MIB = 1024 ** 2


def bench_ms(fn, rep=200):
    if HAS_CUDA:
        return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def peak_above(fn, keep_bytes):
    """Peak bytes allocated during fn() above what was allocated before, minus keep_bytes."""
    if not HAS_CUDA:
        fn()
        return None
    sync()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    sync()
    peak = torch.cuda.max_memory_allocated() - base - keep_bytes
    del out
    return peak / MIB


def make_inputs(N, H, V, dtype, device, kind, seed=0):
    """(hidden (N, H), weight (V, H), targets (N,), mean entropy): the benchmark's inputs
    (bench.cases.make_inputs: targets sampled from the model's softmax) as one sequence."""
    from bench.cases import Shape
    from bench.cases import make_inputs as cases_inputs
    x = cases_inputs(Shape(1, N, H, V, str(dtype).replace("torch.", "")), kind, device, seed)
    return (x.hidden.detach().reshape(N, H), x.weight.detach(), x.targets.reshape(N),
            x.entropy)


def reference_fp32(h, w, y, g, chunk=1024):
    """fp32 chunked PyTorch logp, dhidden, dweight for loss = sum(g * logp)."""
    hf, wf = h.float(), w.float()
    logp = torch.empty(h.shape[0], device=h.device)
    dh = torch.empty_like(hf)
    dw = torch.zeros_like(wf)
    for r0 in range(0, h.shape[0], chunk):
        r1 = min(h.shape[0], r0 + chunk)
        z = hf[r0:r1] @ wf.T
        lse = torch.logsumexp(z, -1, keepdim=True)
        logp[r0:r1] = (z.gather(1, y[r0:r1, None]) - lse)[:, 0]
        dz = torch.exp(z - lse).mul_(-g[r0:r1, None])
        dz[torch.arange(r1 - r0, device=h.device), y[r0:r1]] += g[r0:r1]
        dh[r0:r1] = dz @ wf
        dw.addmm_(dz.T, hf[r0:r1])
        del z, dz
    return logp, dh, dw


def peer_errors(h, w, y, g, ref):
    """Errors against the fp32 reference of two bf16 peers on the same inputs: the materializing
    PyTorch loss (bf16 logits, fp32 log_softmax, autograd: logp, dhidden, dweight) and Liger's
    Triton ``fused_selective_log_softmax`` on those bf16 logits (logp only)."""
    out = {}
    hh = h.detach().clone().requires_grad_(True)
    ww = w.detach().clone().requires_grad_(True)
    z = hh @ ww.T
    lp = torch.log_softmax(z.float(), -1).gather(1, y[:, None])[:, 0]
    (lp * g).sum().backward()
    out["torch_materialized_logp"] = rel_err(lp.detach(), ref[0])
    out["torch_materialized_dhidden"] = rel_err(hh.grad, ref[1])
    out["torch_materialized_dweight"] = rel_err(ww.grad, ref[2])
    try:
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
        # (B, L + 1, V) logits whose row l predicts ids[l]: one padding row at the end.
        logits = torch.cat([z.detach(), z.new_zeros(1, z.shape[1])])[None].contiguous()
        del z
        llp = fused_selective_log_softmax(logits, y[None], temperature=1.0)[0]
        out["liger_triton_logp"] = rel_err(llp, ref[0])
    except ImportError as e:
        out["liger_triton_logp"] = f"not available: {e}"
    return out


def rel_err(x, ref):
    x = x.float()
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


# (BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages). Configs that spill are timed too (to see
# what a spill-free config costs); only spill-free ones may ship (bench.compile_check).
FWD_SWEEP = [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 8, 3),
             (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)]
DZ_SWEEP = [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 8, 3),
            (64, 128, 32, 8, 3), (128, 256, 64, 8, 3)]
WAVE_SWEEP_MIB = [64, 128, 512, 1024]


def tile_sweep(h, w, y, g, lse, save, res):
    """Forward and exact-backward times (peaked) for each tile config and wave size; restores
    the shipped settings. A config that fails to compile or run is recorded as an error string."""
    out = {"fwd": {}, "bwd_exact": {}, "bwd_exact_wave_mib": {}, "splits": {}}
    res["sweep_ms"] = out

    def one(table, cfg_dict, cfg, fn):
        name = "n{}_v{}_k{}_w{}_s{}".format(*cfg)
        saved = dict(cfg_dict)
        cfg_dict.update(dict(zip(("BLOCK_N", "BLOCK_V", "BLOCK_K", "num_warps", "num_stages"),
                                 cfg)))
        try:
            table[name] = bench_ms(fn, rep=50)
        except Exception as e:
            table[name] = f"{type(e).__name__}: {str(e)[:200]}"
        finally:
            cfg_dict.clear()
            cfg_dict.update(saved)
        print("sweep", name, table[name], flush=True)
        save()

    bwd = lambda: fl.fused_linear_backward(h, w, None, y, lse, None, g, None)  # noqa: E731
    for cfg in FWD_SWEEP:
        one(out["fwd"], fl.GPU_FWD_CONFIG, cfg, lambda: fl.fused_linear_forward(h, w, None, y))
    for cfg in DZ_SWEEP:
        one(out["bwd_exact"], fl.GPU_DZ_CONFIG, cfg, bwd)
    shipped = fl.WAVE_BYTES
    for mib in WAVE_SWEEP_MIB:
        fl.WAVE_BYTES = mib * MIB
        try:
            out["bwd_exact_wave_mib"][str(mib)] = bench_ms(bwd, rep=50)
        except Exception as e:
            out["bwd_exact_wave_mib"][str(mib)] = f"{type(e).__name__}: {str(e)[:200]}"
        finally:
            fl.WAVE_BYTES = shipped
    for sp in (8, 16, 32, 64):
        try:
            out["splits"][str(sp)] = bench_ms(
                lambda: fl.fused_linear_forward(h, w, None, y, splits=sp), rep=50)
        except Exception as e:
            out["splits"][str(sp)] = f"{type(e).__name__}: {str(e)[:200]}"
    save()
    return out


def floor_on_dz(h, w, y, g, lse):
    """The three GEMMs with the real dz of these inputs (bf16, N x V, built once) instead of the
    logits: GEMM time can depend on the values (power draw), so this is the floor a loss on such
    a softmax competes with."""
    N, V = h.shape[0], w.shape[0]
    dz = torch.empty(N, V, dtype=h.dtype, device=h.device)
    for r0 in range(0, N, 1024):
        r1 = min(N, r0 + 1024)
        p = torch.exp((h[r0:r1] @ w.T).float() - lse[r0:r1, None])
        p.mul_(-g[r0:r1, None])
        p[torch.arange(r1 - r0, device=h.device), y[r0:r1]] += g[r0:r1]
        dz[r0:r1] = p
        del p

    def floor():
        z = h @ w.T
        return z, dz @ w, dz.T @ h

    ms = bench_ms(floor)
    del dz
    return ms


def markdown(res: dict) -> str:
    """Tables of one gpu_check_fused JSON: times and ratios, errors against fp32 and the bf16
    peers, reruns and batch invariance, sweeps (``python bench/gpu_check_fused.py --report F``)."""
    sh = res["shape"]
    out = [f"### Fused kernels alone: {res['device']}, N={sh['N']} H={sh['H']} V={sh['V']} "
           f"{sh['dtype']}, triton {res['triton']}, torch {res['torch']}", "",
           f"Tile configs: {res['configs']}; wave {res['wave_mib']} MiB; filtered variant "
           f"filter_eps {res['filter_eps']}. Entropy (nats): {res['entropy_nats']}.", "",
           "| variant | fwd+bwd ms | bwd ms | x floor | MiB above inputs+grads | rel err dhidden "
           "| rel err dweight | bitwise rerun | tiles skipped |",
           "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    t = res["times_ms"]
    out.insert(4, f"Floor (3 bare GEMMs): {t.get('floor_3gemm')} ms; on each input's real dz: "
                  + ", ".join(f"{k} {t.get('floor_real_dz_' + k)}" for k in res['entropy_nats'])
                  + " ms; forward alone: "
                  + ", ".join(f"{k} {t.get('fwd_' + k)}" for k in res['entropy_nats']) + " ms.\n")
    for key, ratio in res["ratio_to_floor"].items():
        e = res["rel_err"].get(key) or {}
        mem = res["mem_above_inputs_and_grads_mib"].get(key)
        out.append(f"| {key} | {t.get('fwd_bwd_' + key, float('nan')):.1f} | "
                   f"{t.get('bwd_' + key, float('nan')):.1f} | {ratio:.2f} | "
                   f"{'' if mem is None else f'{mem:.1f}'} | {e.get('dhidden', float('nan')):.2e} | "
                   f"{e.get('dweight', float('nan')):.2e} | {e.get('bitwise_rerun', '')} | "
                   f"{res['skipped_tiles'].get(key, '')} |")
    out += ["", "| inputs | forward bitwise rerun | batch invariant | logp rel err (opo) "
            "| logp rel err (Liger Triton, bf16 logits) | torch materialized bf16: logp / dhidden "
            "/ dweight |", "|---|---|---|---:|---:|---|"]
    for kind, c in (res.get("checks") or {}).items():
        pe = (res.get("peer_rel_err") or {}).get(kind) or {}
        if not c:
            continue
        lg = pe.get("liger_triton_logp")
        out.append(f"| {kind} | {c.get('forward_bitwise_rerun')} | "
                   f"{c.get('forward_batch_invariant')} | {c.get('logp_rel_err', float('nan')):.2e} | "
                   f"{lg if isinstance(lg, str) else f'{lg:.2e}' if lg is not None else ''} | "
                   + " / ".join(f"{pe[k]:.2e}" for k in ("torch_materialized_logp",
                                                         "torch_materialized_dhidden",
                                                         "torch_materialized_dweight") if k in pe)
                   + " |")
    sw = res.get("sweep_ms") or {}
    for table, rows in sw.items():
        cells = ", ".join(f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v[:40]}"
                          for k, v in rows.items())
        out += ["", f"Sweep `{table}` (ms): {cells}"]
    for eps, row in (res.get("filter_eps_sweep") or {}).items():
        if row:
            out.append(f"\nfilter_eps {float(eps):.3g}: bwd {row['bwd_ms']:.1f} ms, rel err "
                       f"dhidden {row.get('dhidden', float('nan')):.2e}, dweight "
                       f"{row.get('dweight', float('nan')):.2e}")
    if res.get("errors"):
        out += ["", f"Errors: {res['errors']}"]
    return "\n".join(out)


def main(argv=None):
    if "--report" in (sys.argv[1:] if argv is None else argv):
        args = sys.argv[1:] if argv is None else argv
        print(markdown(json.load(open(args[args.index("--report") + 1]))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=8192 if HAS_CUDA else 48)
    ap.add_argument("--h", type=int, default=4096 if HAS_CUDA else 32)
    ap.add_argument("--v", type=int, default=151936 if HAS_CUDA else 300)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-ref", action="store_true", help="skip the fp32 error reference")
    args = ap.parse_args(argv)

    device = "cuda" if HAS_CUDA else "cpu"
    dtype = getattr(torch, args.dtype)
    N, H, V = args.n, args.h, args.v
    res = {"shape": {"N": N, "H": H, "V": V, "dtype": args.dtype},
           "device": torch.cuda.get_device_name() if HAS_CUDA else "cpu (interpreter smoke)",
           "triton": triton.__version__, "torch": torch.__version__,
           "configs": {"fwd": dict(fl.GPU_FWD_CONFIG), "dz": dict(fl.GPU_DZ_CONFIG),
                       "filtered": dict(fl.GPU_DET_CONFIG)},
           "wave_mib": fl.WAVE_BYTES / MIB, "filter_eps": FILTER_EPS, "skipped_tiles": {},
           "times_ms": {}, "ratio_to_floor": {}, "mem_above_inputs_and_grads_mib": {},
           "rel_err": {}, "checks": {}, "entropy_nats": {}, "errors": {}}
    torch.backends.cuda.matmul.allow_tf32 = False

    def attempt(name, fn):
        try:
            return fn()
        except Exception as e:  # keep measuring the rest; the JSON says what failed
            res["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            return None

    def save():
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)

    # ---- floor: the three bare GEMMs, same dtype, same run
    gen = torch.Generator(device="cpu").manual_seed(1)
    hf = torch.randn(N, H, generator=gen).to(device, dtype)
    wf = (torch.randn(V, H, generator=gen) / math.sqrt(H)).to(device, dtype)

    def floor():
        z = hf @ wf.T
        dh = z @ wf  # z stands in for dz: same shape, dtype and cost
        dw = z.T @ hf
        return dh, dw

    res["times_ms"]["floor_3gemm"] = attempt("floor", lambda: bench_ms(floor))
    floor_ms = res["times_ms"]["floor_3gemm"]
    del hf, wf
    save()

    variants = {
        "exact": dict(),
        "exact_accum_bf16": dict(accum_fp32=False),
        "filtered": dict(filter_eps=FILTER_EPS),
    }
    kinds = ("peaked", "zipf", "flat")

    for kind in kinds:
        inp = attempt(f"inputs_{kind}", lambda: make_inputs(N, H, V, dtype, device, kind))
        if inp is None:
            continue
        h, w, y, ent = inp
        res["entropy_nats"][kind] = ent
        g = (torch.randn(N, generator=torch.Generator().manual_seed(2)) / N).to(device)
        grads_bytes = h.numel() * h.element_size() + w.numel() * w.element_size()

        ref = None
        if not args.no_ref:
            ref = attempt(f"reference_{kind}", lambda: reference_fp32(h, w, y, g))
            if ref is not None and HAS_CUDA:
                res.setdefault("peer_rel_err", {})[kind] = attempt(
                    f"peers_{kind}", lambda: peer_errors(h, w, y, g, ref))
                torch.cuda.empty_cache()

        # forward alone, and its determinism / batch invariance
        fwd_ms = attempt(f"fwd_{kind}", lambda: bench_ms(lambda: fl.fused_linear_forward(
            h, w, None, y)))
        res["times_ms"][f"fwd_{kind}"] = fwd_ms

        def checks():
            a = fl.fused_linear_forward(h, w, None, y)
            b = fl.fused_linear_forward(h, w, None, y)
            rerun = all(torch.equal(x, z) for x, z in zip(a, b))
            k = min(N, 77)
            alone = fl.fused_linear_forward(h[:k].clone(), w, None, y[:k].clone())
            perm = torch.randperm(N, device=h.device)
            shuf = fl.fused_linear_forward(h[perm], w, None, y[perm])
            inv = all(torch.equal(x, z[:k]) for x, z in zip(alone, a)) and \
                all(torch.equal(x, z[perm]) for x, z in zip(shuf, a))
            out = {"forward_bitwise_rerun": rerun, "forward_batch_invariant": inv}
            if ref is not None:
                out["logp_rel_err"] = rel_err(a[0], ref[0])
                out["logp_max_abs_err"] = float((a[0] - ref[0]).abs().max())
            return out

        res["checks"][kind] = attempt(f"checks_{kind}", checks)
        save()

        res["times_ms"][f"floor_real_dz_{kind}"] = attempt(
            f"floor_real_dz_{kind}", lambda: floor_on_dz(
                h, w, y, g, fl.fused_linear_forward(h, w, None, y)[1]))
        for name, opts in variants.items():
            key = f"{kind}_{name}"

            def step(opts=opts):
                logp, lse, e = fl.fused_linear_forward(h, w, None, y)
                return fl.fused_linear_backward(h, w, None, y, lse, e, g, None, **opts)

            def bwd_only(opts=opts):
                return fl.fused_linear_backward(h, w, None, y, st["lse"], None, g, None, **opts)

            st = {}
            _, st["lse"], _ = fl.fused_linear_forward(h, w, None, y)
            t = attempt(f"time_{key}", lambda: bench_ms(step))
            res["times_ms"][f"fwd_bwd_{key}"] = t
            res["times_ms"][f"bwd_{key}"] = attempt(f"time_bwd_{key}", lambda: bench_ms(bwd_only))
            if t is not None and floor_ms:
                res["ratio_to_floor"][key] = t / floor_ms
            res["mem_above_inputs_and_grads_mib"][key] = attempt(
                f"mem_{key}", lambda: peak_above(step, grads_bytes))
            if ref is not None:
                def errs():
                    dh, dw, _ = step()
                    out = {"dhidden": rel_err(dh, ref[1]), "dweight": rel_err(dw, ref[2])}
                    dh2, dw2, _ = step()
                    out["bitwise_rerun"] = bool(torch.equal(dh, dh2) and torch.equal(dw, dw2))
                    return out
                res["rel_err"][key] = attempt(f"err_{key}", errs)
            if "filter_eps" in opts:
                res["skipped_tiles"][key] = attempt(f"skipped_{key}", lambda: fl.skipped_tile_fraction(
                    h, w, None, y, st["lse"], None, g, None, filter_eps=opts["filter_eps"]))
            save()
            print(key, res["times_ms"].get(f"fwd_bwd_{key}"), res["ratio_to_floor"].get(key),
                  flush=True)

        if args.sweep and kind == "peaked" and HAS_CUDA:
            res["sweep_ms"] = attempt("sweep", lambda: tile_sweep(h, w, y, g, st["lse"], save,
                                                                  res))
            thr = res.setdefault("filter_eps_sweep", {})
            for eps in (2.0 ** -4, 2.0 ** -12):
                def one_eps(eps=eps):
                    fn = lambda: fl.fused_linear_backward(h, w, None, y, st["lse"], None, g, None,  # noqa: E731
                                                          filter_eps=eps)
                    row = {"bwd_ms": bench_ms(fn, rep=50), "skipped_tiles": fl.skipped_tile_fraction(
                        h, w, None, y, st["lse"], None, g, None, filter_eps=eps)}
                    if ref is not None:
                        dh, dw, _ = fn()
                        row.update(dhidden=rel_err(dh, ref[1]), dweight=rel_err(dw, ref[2]))
                    return row
                thr[str(eps)] = attempt(f"filter_eps_{eps}", one_eps)
                save()
        del h, w, y, g, ref
        if HAS_CUDA:
            torch.cuda.empty_cache()

    save()
    print(json.dumps({k: res[k] for k in ("entropy_nats", "times_ms", "ratio_to_floor",
                                          "mem_above_inputs_and_grads_mib", "errors")}, indent=1))


if __name__ == "__main__":
    main()
