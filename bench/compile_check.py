"""GPU compile gate that needs no GPU: ``python -m bench.compile_check``.

Compiles every Triton kernel variant of opo_kernels (the vocabulary pass: forward, backward with
and without the entropy gradient; the fused GEMM + vocabulary pass: forward partials, merge, the
exact backward's dz-wave kernel, the filtered backward's dhidden / dweight kernels with fp32 or
own-dtype accumulation; each with and without logit soft-capping, ``_cap`` in the name) in bf16,
fp16 and fp32, at the tile configurations the installed Triton
gets (``opo_kernels.fused_linear.gpu_tables``), for sm_80 and sm_90, with the Triton wheel's
bundled ``ptxas``. Prints one row per variant (registers, spill bytes, shared memory, whether
wgmma is used) and exits non-zero on any compile failure or register spill (``--spills warn``:
spills are reported, not failed; for trying configs).

    python -m bench.compile_check                 # both archs, shipped configs
    python -m bench.compile_check --arch 90 --fwd 128,256,64,8,3   # try a forward tile config

Run it under another Triton with ``PYTHONPATH=DIR`` after ``pip install --no-deps --target DIR
triton==3.6.0`` (CI does, for the GPU machines' version).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # real compilation, whatever the caller's environment

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from opo_kernels import fused_linear as fl  # noqa: E402
from opo_kernels import vocab_triton as vt  # noqa: E402

TILE_KEYS = ("BLOCK_N", "BLOCK_V", "BLOCK_K", "num_warps", "num_stages")
_TL = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def _signature(fn, ptr_types: dict, float_args=()) -> dict:
    """Triton signature from parameter names: pointers by ``ptr_types`` (default fp32), the
    named float scalars as fp32, other scalars i32."""
    sig = {}
    for p in fn.params:
        n = p.name
        if p.is_constexpr:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = "*" + ptr_types.get(n, "fp32")
        elif n in float_args:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return sig


def variants(fwd=None, dz=None, det=None):
    """(name, dtype, jit fn, signature, constexprs, launch options, gated) for each variant.
    ``fwd``/``dz``/``det`` override the bf16/fp16 tile configs."""
    out = []
    fused_floats = ("inv_temp", "cap", "filter_eps")
    for dt in ("bf16", "fp16", "fp32"):
        fp32 = dt == "fp32"
        cf = dict(fl.GPU_FWD_CONFIG_FP32 if fp32 else (fwd or fl.GPU_FWD_CONFIG))
        cz = dict(fl.GPU_DZ_CONFIG_FP32 if fp32 else (dz or fl.GPU_DZ_CONFIG))
        cd = dict(fl.GPU_DET_CONFIG_FP32 if fp32 else (det or fl.GPU_DET_CONFIG))
        gate = True
        inputs = {"h_ptr": dt, "w_ptr": dt, "b_ptr": dt, "t_ptr": "i64"}

        def tiles(c):
            return {k: c[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_K")}

        def opts(c):
            return {"num_warps": c["num_warps"], "num_stages": c["num_stages"]}

        for cap in (False, True):
            sc = "_cap" if cap else ""
            base = {"HAS_BIAS": True, "SOFTCAP": cap, "FP32_DOT": fp32, "INTERP": False}
            out.append((f"fused_fwd_{dt}{sc}", dt, fl._fwd_partials_kernel,
                        _signature(fl._fwd_partials_kernel, inputs, fused_floats),
                        {**base, **tiles(cf)}, opts(cf), gate))
            for ent in (True, False):
                out.append((f"fused_bwd_dz_{dt}_ent{int(ent)}{sc}", dt, fl._bwd_dz_kernel,
                            _signature(fl._bwd_dz_kernel, {**inputs, "dz_ptr": dt}, fused_floats),
                            {**base, **tiles(cz), "HAS_ENT": ent, "NEED_DB": True}, opts(cz), gate))
            cdc = fl.det_config(cd, 1.0 if cap else None,  # the filtered kernels' tiles
                                {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt])
            for acc in sorted({"fp32", dt}):
                grads = {**inputs, "dh_ptr": acc, "dw_ptr": acc, "db_ptr": acc}
                c = {**base, **tiles(cdc), "HAS_ENT": True, "FILTER": True}
                out.append((f"fused_bwd_dh_{dt}_acc{acc}{sc}", dt, fl._bwd_dh_kernel,
                            _signature(fl._bwd_dh_kernel, grads, fused_floats),
                            {**c, "STATS": False}, opts(cdc), gate))
                out.append((f"fused_bwd_dw_{dt}_acc{acc}{sc}", dt, fl._bwd_dw_kernel,
                            _signature(fl._bwd_dw_kernel, grads, fused_floats),
                            {**c, "NEED_DW": True, "NEED_DB": True}, opts(cdc), gate))
            # The vocabulary pass at its largest block (the one every V >= 4096 uses).
            block = vt._GPU_MAX_BLOCK
            warps = max(1, min(8, block // 512))
            vopts = {"num_warps": warps, "num_stages": 1}
            out.append((f"vocab_fwd_{dt}{sc}", dt, vt._vocab_forward_kernel,
                        _signature(vt._vocab_forward_kernel, {"logits_ptr": dt, "targets_ptr": "i64"},
                                   ("inv_temp", "cap")), {"SOFTCAP": cap, "BLOCK_V": block}, vopts,
                        gate))
            for ent in (True, False):
                out.append((f"vocab_bwd_{dt}_ent{int(ent)}{sc}", dt, vt._vocab_backward_kernel,
                            _signature(vt._vocab_backward_kernel,
                                       {"logits_ptr": dt, "out_ptr": dt, "targets_ptr": "i64"},
                                       ("inv_temp", "cap")),
                            {"HAS_ENTROPY_GRAD": ent, "SOFTCAP": cap, "BLOCK_V": block}, vopts,
                            gate))
    out.append(("fused_merge", "fp32", fl._fwd_merge_kernel,
                _signature(fl._fwd_merge_kernel, {"t_ptr": "i64"}),
                {"BLOCK": fl._MERGE_BLOCK}, {"num_warps": 4, "num_stages": 1}, True))
    return out


def _ptxas() -> list[str]:
    """The wheel's ptxas binaries, newest first (a PTX version an older one rejects goes on to
    the next)."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return [p for p in (os.path.join(bindir, n) for n in ("ptxas-blackwell", "ptxas"))
            if os.path.exists(p)]


def compile_one(fn, sig, consts, options, arch, tmp, ptxas):
    """(registers, spill bytes, shared bytes, wgmma used) of one variant on sm_<arch>."""
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32),
                       options=options)
    ptx = k.asm["ptx"]
    regs = spill = None
    if ptxas:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        for exe in ptxas:
            r = subprocess.run([exe, f"-arch=sm_{arch}{suffix}", "-v", path, "-o", os.devnull],
                               capture_output=True, text=True)
            if r.returncode == 0:
                break
        else:
            raise RuntimeError(f"ptxas failed: {r.stderr.strip()[:300]}")
        m = re.search(r"Used (\d+) registers", r.stderr)
        regs = int(m.group(1)) if m else None
        spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", r.stderr))
    shared = getattr(k.metadata, "shared", None)
    return regs, spill, shared, "wgmma" in ptx


def _tile(text):
    vals = [int(v) for v in text.split(",")]
    if len(vals) != 5:
        raise argparse.ArgumentTypeError("a tile config is BLOCK_N,BLOCK_V,BLOCK_K,warps,stages")
    return dict(zip(TILE_KEYS, vals))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compile_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, action="append", choices=(80, 90),
                    help="compute capability (repeatable; default 80 and 90)")
    ap.add_argument("--fwd", type=_tile, help="bf16/fp16 fused forward tile config to try")
    ap.add_argument("--dz", type=_tile, help="bf16/fp16 fused exact backward (dz wave) config")
    ap.add_argument("--det", type=_tile, help="bf16/fp16 fused filtered backward config")
    ap.add_argument("--only", help="regex on variant names")
    ap.add_argument("--spills", choices=("fail", "warn"), default="fail",
                    help="a spill fails (default) or is only reported (to try configs)")
    args = ap.parse_args(argv)
    archs = args.arch or [80, 90]
    ptxas = _ptxas()
    print(f"triton {triton.__version__}; ptxas: {', '.join(map(os.path.basename, ptxas)) or 'none'}")
    print(f"{'variant':38s} {'arch':>4s} {'regs':>4s} {'spill':>5s} {'smem':>7s} wgmma")
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, _dt, fn, sig, consts, options, gate in variants(args.fwd, args.dz, args.det):
            if args.only and not re.search(args.only, name):
                continue
            for arch in archs:
                try:
                    regs, spill, shared, mma = compile_one(fn, sig, consts, options, arch, tmp,
                                                           ptxas)
                except Exception as e:  # every variant is tried; the exit code says it failed
                    msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
                    print(f"{name:38s} {arch:4d} FAILED {type(e).__name__}: {msg}", flush=True)
                    failures.append(f"{name} sm_{arch}: {type(e).__name__}")
                    continue
                bad = gate and bool(spill)
                print(f"{name:38s} {arch:4d} {regs!s:>4s} {spill!s:>5s} {shared!s:>7s} "
                      f"{'yes' if mma else 'no'}{'   <- spills' if bad else ''}",
                      flush=True)
                if bad and args.spills == "fail":
                    failures.append(f"{name} sm_{arch}: {spill} spill bytes")
    if failures:
        print(f"compile_check: {len(failures)} problem(s): " + "; ".join(failures))
        return 1
    print("compile_check: every variant compiled" + ("; no spills" if args.spills == "fail"
                                                     else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
