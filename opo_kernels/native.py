"""The native CPU vocabulary pass: ``csrc/vocab_pass.cpp`` built as torch ops on first use.

Same contract as :mod:`opo_kernels.vocab_torch` (``vocab_forward`` / ``vocab_backward``), run by
``torch.ops.opo.vocab_forward`` / ``torch.ops.opo.vocab_backward``: C++ with OpenMP over rows
(``torch.set_num_threads`` applies), fp32 arithmetic, logits fp32/bf16/fp16.

The extension is compiled by :func:`torch.utils.cpp_extension.load` the first time
:func:`available` (or :func:`build`) is called, into a cache directory keyed by the torch
version, the source hash, the compiler flags and the CPU's instruction-set flags (the code is
built with ``-march=native``, or ``-march=$OPO_NATIVE_MARCH``):

    $OPO_NATIVE_BUILD_DIR (default ~/.cache/opo_kernels/native) / <torch>-<key>/

A finished build is loaded straight from there without invoking the compiler again.
cpp_extension's file lock makes concurrent first builds from several processes safe; a lock
here does the same for threads. ``python -m opo_kernels.native`` pre-builds it.

If there is no compiler or the build fails, :func:`available` returns False and warns once
(``RuntimeWarning``); callers then use the chunked PyTorch pass. ``OPO_DISABLE_NATIVE=1`` makes
:func:`available` return False without building (to exercise the fallback).
"""
from __future__ import annotations

import hashlib
import os
import platform
import threading
import time
import warnings
from pathlib import Path

import torch

_NAME = "opo_vocab_native"
# OPO_NATIVE_MARCH picks the target (e.g. x86-64-v3 for a cache shared by different CPUs).
_FLAGS = ["-O3", "-march=" + (os.environ.get("OPO_NATIVE_MARCH") or "native"), "-fopenmp"]
_LDFLAGS = ["-fopenmp"]

_lock = threading.RLock()  # available() holds it around build(), which takes it too
_state: dict = {"ok": None, "error": None, "build_seconds": None}


def _source() -> Path:
    # The package is installed editable: the sources live at <repo>/csrc next to the package.
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "csrc" / "vocab_pass.cpp", here / "csrc" / "vocab_pass.cpp"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"opo_kernels: csrc/vocab_pass.cpp not found next to {here}")


def _cpu_flags() -> str:
    """The CPU's instruction-set flags, so a cache shared across machines never runs
    -march=native code built for a different CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_directory() -> Path:
    """Where the extension for this torch, source, flags and CPU is (or will be) built."""
    base = os.environ.get("OPO_NATIVE_BUILD_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "opo_kernels", "native")
    h = hashlib.sha256()
    h.update(_source().read_bytes())
    for part in (torch.__version__, " ".join(_FLAGS), " ".join(_LDFLAGS), _cpu_flags(),
                 os.environ.get("CXX", "")):
        h.update(b"\0" + part.encode())
    tag = torch.__version__.replace("+", "_")
    return Path(base) / f"{tag}-{h.hexdigest()[:16]}"


def _ops_registered() -> bool:
    try:
        torch.ops.opo.vocab_forward  # noqa: B018
        torch.ops.opo.vocab_backward  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def build(verbose: bool = False) -> Path:
    """Compile (if not cached) and load the extension; return the build directory.

    Raises whatever the compiler or loader raised; :func:`available` is the non-raising form.
    """
    with _lock:
        bdir = build_directory()
        if _ops_registered():
            _register_fake()
            return bdir
        done = bdir / "ok"
        lib = bdir / f"{_NAME}.so"
        if done.is_file() and lib.is_file():
            torch.ops.load_library(str(lib))
        else:
            from torch.utils import cpp_extension

            bdir.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            cpp_extension.load(name=_NAME, sources=[str(_source())], extra_cflags=_FLAGS,
                               extra_ldflags=_LDFLAGS, build_directory=str(bdir),
                               is_python_module=False, verbose=verbose)
            _state["build_seconds"] = time.perf_counter() - t0
            # Marks the .so as complete for the fast path above (written only after it loaded).
            done.write_text(torch.__version__ + "\n")
        if not _ops_registered():
            raise RuntimeError(f"opo_kernels: {lib} loaded but torch.ops.opo.vocab_* are missing")
        _register_fake()
        return bdir


def _register_fake() -> None:
    """Shape-only versions of the ops, so torch.compile can trace through them."""
    if _state.get("fake"):
        return
    _state["fake"] = True
    try:
        @torch.library.register_fake("opo::vocab_forward")
        def _(logits, targets, temperature, softcap=None):
            n = logits.shape[0]
            return tuple(logits.new_empty((n,), dtype=torch.float32) for _ in range(3))

        @torch.library.register_fake("opo::vocab_backward")
        def _(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature, out,
              softcap=None):
            return None
    except RuntimeError:  # already registered (e.g. the library was loaded by someone else)
        pass


def available() -> bool:
    """True when the native ops are loaded (building them on the first call).

    Never raises: on failure it warns once and returns False from then on.
    """
    if os.environ.get("OPO_DISABLE_NATIVE", "") not in ("", "0"):
        return False  # not cached: the variable is read on every call
    if _state["ok"] is not None:
        return _state["ok"]
    with _lock:  # one build attempt and one warning, even with several threads asking at once
        if _state["ok"] is not None:
            return _state["ok"]
        try:
            build()
            _state["ok"] = True
        except Exception as e:  # noqa: BLE001 - any build/load failure means "use the fallback"
            _state["ok"] = False
            _state["error"] = e
            first = str(e).strip().splitlines()[:1]
            warnings.warn(
                "opo_kernels: could not build the native CPU vocabulary pass "
                f"({type(e).__name__}: {first[0] if first else ''}); the chunked PyTorch path "
                "(opo_kernels.vocab_torch) is used instead. Run `python -m opo_kernels.native` "
                "to see the full build log.",
                RuntimeWarning, stacklevel=2)
    return _state["ok"]


def _ops():
    if not available():
        raise RuntimeError("opo_kernels: the native CPU vocabulary pass is unavailable "
                           f"({_state['error'] or 'OPO_DISABLE_NATIVE is set'})")
    return torch.ops.opo


def vocab_forward(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                  softcap: float | None = None):
    """Per-row ``(logp, lse, entropy)``, each fp32 (n,), of ``logits`` (n, V) fp32/bf16/fp16
    (last dim contiguous) and ``targets`` (n,) int64. See :mod:`opo_kernels.vocab_torch` for the
    contract and the formulas (``softcap``: s = softcap · tanh(logits / temperature / softcap);
    that path computes tanh element by element, without the vectorized pass's speed)."""
    return _ops().vocab_forward(logits, targets, float(temperature),
                                None if softcap is None else float(softcap))


def vocab_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                   entropy: torch.Tensor | None, grad_logp: torch.Tensor,
                   grad_entropy: torch.Tensor | None, temperature: float = 1.0,
                   out: torch.Tensor | None = None, softcap: float | None = None):
    """Write dz (n, V) into ``out`` (default: a new tensor of ``logits``' dtype; may be
    ``logits`` itself) and return it. ``lse``, ``entropy``, ``grad_logp``, ``grad_entropy`` are
    (n,); the entropy term is skipped when ``grad_entropy`` is None."""
    ops = _ops()
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if grad_entropy is None:
        entropy = None
    ops.vocab_backward(logits, targets, lse, entropy, grad_logp, grad_entropy, float(temperature), out,
                       None if softcap is None else float(softcap))
    return out


if __name__ == "__main__":
    t0 = time.perf_counter()
    path = build(verbose=True)
    took = _state["build_seconds"]
    print(f"opo_kernels native vocabulary pass ready in {path} "
          + (f"(built in {took:.1f} s)" if took is not None else
             f"(cached, loaded in {time.perf_counter() - t0:.2f} s)"))
