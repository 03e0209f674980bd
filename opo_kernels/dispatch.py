"""The backends: one object per implementation of the LM-head pass, asked for by every path.

A :class:`Backend` answers three questions for hidden states ``(N, H)``, a weight ``(V, H)``, an
optional bias and targets ``(N,)`` that are all valid (the public functions take masked positions
out before a backend sees them, so no backend knows about ``mask`` or ``ignore_index``):

* :meth:`Backend.logprobs` — per-token ``(logp, lse, entropy)``, fp32, no autograd;
* :meth:`Backend.grads` — the gradients of ``sum(g_logp · logp + g_ent · entropy)`` w.r.t.
  hidden, weight and bias, recomputing whatever the forward did not keep;
* :attr:`Backend.one_pass` / :meth:`Backend.one_pass_loss` — whether it can compute a loss and its
  gradients in one pass over the logits (the chunked backends can), and doing so.

The backends (``backend=`` of the public functions):

* ``triton`` / ``native`` / ``torch`` — :class:`ChunkedBackend`: the GEMM one token chunk at a
  time (:mod:`opo_kernels.chunked`) and a vocabulary pass over each chunk of logits, in Triton
  (:mod:`opo_kernels.vocab_triton`), C++/OpenMP (:mod:`opo_kernels.native`) or PyTorch
  (:mod:`opo_kernels.vocab_torch`);
* ``fused`` — :class:`FusedBackend`: Triton kernels that fuse the GEMM with the vocabulary pass
  (:mod:`opo_kernels.fused_linear`); logits never reach memory;
* ``reference`` — :class:`ReferenceBackend`: materialized fp32 logits, for tests;
* ``auto`` — ``triton`` on CUDA tensors, ``native`` on CPU tensors (``torch`` if the native op
  cannot be built).
"""
from __future__ import annotations

import warnings

import torch

from . import checks, chunked
from .checks import BACKENDS  # noqa: F401  (imported from here by callers)


def pass_params(temperature: float, logit_scale: float = 1.0, softcap=None):
    """The vocabulary pass's ``(temperature, softcap)`` for the public options.

    The public transform of logits z is ``s = c·tanh(scale·z / c) / T`` (softcap c) or
    ``s = scale·z / T``. Every vocabulary pass computes it as ``u = z / t`` then
    ``s = k·tanh(u / k)`` (k not None) with ``t = T / scale`` and ``k = c / T``: the same s, with
    the scale folded into the temperature (exact in real arithmetic), so a pass without softcap
    is the plain temperature pass."""
    t = float(temperature) / float(logit_scale)
    return t, (None if softcap is None else float(softcap) / float(temperature))


class Backend:
    """Base class; see the module docstring. The pass's logits are ``s = z / temperature``, then
    ``s = softcap·tanh(s / softcap)`` when ``softcap`` is not None (:func:`pass_params`)."""

    name = "?"
    one_pass = False

    def __init__(self, temperature: float, softcap=None):
        self.temperature = float(temperature)
        self.softcap = softcap

    def logprobs(self, hidden, weight, bias, targets):
        """``(logp, lse, entropy)``: three fp32 (N,) tensors."""
        raise NotImplementedError

    def grads(self, hidden, weight, bias, targets, lse, entropy, g_logp, g_ent,
              need_hidden: bool, need_weight: bool, need_bias: bool):
        """``(dhidden, dweight, dbias)`` in the dtypes of the inputs (None where not needed).
        ``g_logp`` (N,) fp32; ``g_ent`` (N,) fp32 or None (no entropy term)."""
        raise NotImplementedError

    def one_pass_loss(self, hidden, weight, bias, la, need_hidden, need_weight, need_bias):
        raise NotImplementedError(f"backend {self.name!r} has no one-pass loss")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class ChunkedBackend(Backend):
    """GEMM per token chunk + a vocabulary pass module (``vocab_forward`` / ``vocab_backward``)."""

    one_pass = True

    def __init__(self, name, vocab, temperature, softcap, chunk: int, chunks: list):
        super().__init__(temperature, softcap)
        self.name = name
        self.vocab_forward, self.vocab_backward = vocab.vocab_forward, vocab.vocab_backward
        self.chunk, self.chunks = chunk, chunks

    def logprobs(self, hidden, weight, bias, targets):
        return chunked.logprobs(self, hidden, weight, bias, targets)

    def grads(self, hidden, weight, bias, targets, lse, entropy, g_logp, g_ent,
              need_hidden, need_weight, need_bias):
        return chunked.grads(self, hidden, weight, bias, targets, lse, entropy, g_logp, g_ent,
                             need_hidden, need_weight, need_bias)

    def one_pass_loss(self, hidden, weight, bias, la, need_hidden, need_weight, need_bias):
        return chunked.one_pass_loss(self, hidden, weight, bias, la, need_hidden, need_weight,
                                     need_bias)


class FusedBackend(Backend):
    """:mod:`opo_kernels.fused_linear`: the GEMM and the vocabulary pass in the same kernels."""

    name = "fused"

    def __init__(self, temperature, softcap, filter_eps, deterministic, accum_fp32):
        super().__init__(temperature, softcap)
        self.filter_eps, self.deterministic = filter_eps, deterministic
        self.accum_fp32 = accum_fp32

    def logprobs(self, hidden, weight, bias, targets):
        from .fused_linear import fused_linear_forward
        return fused_linear_forward(hidden, weight, bias, targets, self.temperature,
                                    softcap=self.softcap)

    def grads(self, hidden, weight, bias, targets, lse, entropy, g_logp, g_ent,
              need_hidden, need_weight, need_bias):
        from .fused_linear import fused_linear_backward
        return fused_linear_backward(hidden, weight, bias, targets, lse, entropy, g_logp, g_ent,
                                     self.temperature, softcap=self.softcap,
                                     need_hidden=need_hidden,
                                     need_weight=need_weight, need_bias=need_bias,
                                     filter_eps=self.filter_eps, deterministic=self.deterministic,
                                     accum_fp32=self.accum_fp32)


class ReferenceBackend(Backend):
    """Materialized fp32 logits and the textbook formulas (tests; memory N·V)."""

    name = "reference"

    def _scaled_logits(self, hidden, weight, bias):
        z = hidden.float() @ weight.float().t()
        if bias is not None:
            z = z + bias.float()
        s = z / self.temperature
        if self.softcap is not None:
            s = self.softcap * torch.tanh(s / self.softcap)
        return s

    def logprobs(self, hidden, weight, bias, targets):
        s = self._scaled_logits(hidden, weight, bias)
        m = s.amax(-1, keepdim=True)
        sm = s - m
        e = sm.exp()
        d = e.sum(-1)
        lse = m.squeeze(-1) + d.log()
        # −inf logits have e = 0: their e·(s − m) is 0, not 0·(−inf).
        ent = d.log() - torch.where(e > 0, e * sm, 0.0).sum(-1) / d
        logp = s.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
        return logp, lse, ent

    def grads(self, hidden, weight, bias, targets, lse, entropy, g_logp, g_ent,
              need_hidden, need_weight, need_bias):
        s = self._scaled_logits(hidden, weight, bias)
        p = torch.exp(s - lse[:, None])
        dz = -g_logp[:, None] * p
        dz.scatter_add_(1, targets[:, None], g_logp[:, None])
        if g_ent is not None:
            dz -= g_ent[:, None] * torch.where(p > 0, p * (s - lse[:, None] + entropy[:, None]), 0.0)
        if self.softcap is not None:  # ds/du = 1 − tanh²(u / softcap)
            dz *= 1.0 - (s / self.softcap).square()
        dz /= self.temperature
        dh = (dz @ weight.float()).to(hidden.dtype) if need_hidden else None
        dw = (dz.t() @ hidden.float()).to(weight.dtype) if need_weight else None
        db = dz.sum(0).to(bias.dtype) if need_bias else None
        return dh, dw, db


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend ``backend`` (possibly "auto") means for tensors on ``device``."""
    checks.check_choice("backend", backend, BACKENDS)
    if backend in ("triton", "fused"):
        checks.check_triton_device(device, f"backend={backend!r}")
        return backend
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        from . import native
        return "native" if native.available() else "torch"
    return "torch"


def get_backend(backend: str, device: torch.device, *, temperature: float, V: int,
                lengths: list[int], logit_scale=1.0, softcap=None, chunk_size=None,
                filter_eps=None, deterministic=False, accum_fp32=True) -> Backend:
    """Validate the backend options and build the backend for one call (the vocabulary options
    ``temperature``, ``logit_scale``, ``softcap`` are checked by the caller)."""
    name = resolve(backend, device)
    checks.check_backend_options(name, chunk_size, filter_eps, deterministic, accum_fp32)
    t, cap = pass_params(temperature, logit_scale, softcap)
    if name == "fused":
        return FusedBackend(t, cap, filter_eps, deterministic, accum_fp32)
    if name == "reference":
        return ReferenceBackend(t, cap)
    if name == "triton":
        from . import vocab_triton as vocab
    elif name == "native":
        from . import native as vocab
        if not vocab.available():
            warnings.warn("opo_kernels: native CPU op unavailable; using the torch vocabulary pass",
                          RuntimeWarning, stacklevel=3)
            from . import vocab_torch as vocab
            name = "torch"
    else:
        from . import vocab_torch as vocab
    chunk = chunk_size or chunked.default_chunk_tokens(V, device)
    return ChunkedBackend(name, vocab, t, cap, chunk, chunked.plan_chunks(lengths, chunk))
