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
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import checks, chunked
from .options import BackendOptions


class Needs(NamedTuple):
    """Which gradients a backward computes (False where an input needs none, or is None)."""
    hidden: bool
    weight: bool
    bias: bool


@dataclass(frozen=True)
class UpstreamGrad:
    """What :meth:`Backend.grads` differentiates, ``sum(g_logp · logp + g_ent · entropy)``, with
    the forward's per-token statistics it reuses. lse, entropy, g_logp: (N,) fp32; g_ent: (N,) fp32
    or None (no entropy term)."""
    lse: torch.Tensor
    entropy: torch.Tensor
    g_logp: torch.Tensor
    g_ent: torch.Tensor | None


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
    """Base class; see the module docstring. ``options``: the call's
    :class:`opo_kernels.options.BackendOptions`. The pass's logits are ``s = z / temperature``,
    then ``s = softcap·tanh(s / softcap)`` when ``softcap`` is not None, with ``temperature`` and
    ``softcap`` from :func:`pass_params` (the options' logit_scale folded into the temperature)."""

    name = "?"
    one_pass = False

    def __init__(self, options: BackendOptions):
        self.options = options
        self.temperature, self.softcap = pass_params(options.temperature, options.logit_scale,
                                                     options.softcap)

    def logprobs(self, hidden, weight, bias, targets):
        """``(logp, lse, entropy)``: three fp32 (N,) tensors."""
        raise NotImplementedError

    def grads(self, hidden, weight, bias, targets, up: UpstreamGrad, needs: Needs):
        """``(dhidden, dweight, dbias)`` in the dtypes of the inputs (None where not needed)."""
        raise NotImplementedError

    def one_pass_loss(self, hidden, weight, bias, la, needs: Needs):
        raise NotImplementedError(f"backend {self.name!r} has no one-pass loss")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class ChunkedBackend(Backend):
    """GEMM per token chunk + a vocabulary pass module (``vocab_forward`` / ``vocab_backward``)."""

    one_pass = True

    def __init__(self, name, vocab, options: BackendOptions, chunk: int, chunks: list):
        super().__init__(options)
        self.name = name
        self.vocab_forward, self.vocab_backward = vocab.vocab_forward, vocab.vocab_backward
        self.chunk, self.chunks = chunk, chunks

    def logprobs(self, hidden, weight, bias, targets):
        return chunked.logprobs(self, hidden, weight, bias, targets)

    def grads(self, hidden, weight, bias, targets, up, needs):
        return chunked.grads(self, hidden, weight, bias, targets, up, needs)

    def one_pass_loss(self, hidden, weight, bias, la, needs):
        return chunked.one_pass_loss(self, hidden, weight, bias, la, needs)


class FusedBackend(Backend):
    """:mod:`opo_kernels.fused_linear`: the GEMM and the vocabulary pass in the same kernels."""

    name = "fused"

    def logprobs(self, hidden, weight, bias, targets):
        from .fused_linear import fused_linear_forward
        return fused_linear_forward(hidden, weight, bias, targets, self.temperature,
                                    softcap=self.softcap)

    def grads(self, hidden, weight, bias, targets, up, needs):
        from .fused_linear import fused_linear_backward
        return fused_linear_backward(hidden, weight, bias, targets, up.lse, up.entropy, up.g_logp,
                                     up.g_ent, self.temperature, softcap=self.softcap,
                                     need_hidden=needs.hidden,
                                     need_weight=needs.weight, need_bias=needs.bias,
                                     filter_eps=self.options.filter_eps,
                                     accum_fp32=self.options.accum_fp32)


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

    def grads(self, hidden, weight, bias, targets, up, needs):
        s = self._scaled_logits(hidden, weight, bias)
        lse = up.lse[:, None]
        p = torch.exp(s - lse)
        dz = -up.g_logp[:, None] * p
        dz.scatter_add_(1, targets[:, None], up.g_logp[:, None])
        if up.g_ent is not None:
            dz -= up.g_ent[:, None] * torch.where(p > 0, p * (s - lse + up.entropy[:, None]), 0.0)
        if self.softcap is not None:  # ds/du = 1 − tanh²(u / softcap)
            dz *= 1.0 - (s / self.softcap).square()
        dz /= self.temperature
        dh = (dz @ weight.float()).to(hidden.dtype) if needs.hidden else None
        dw = (dz.t() @ hidden.float()).to(weight.dtype) if needs.weight else None
        db = dz.sum(0).to(bias.dtype) if needs.bias else None
        return dh, dw, db


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend ``backend`` (one of BACKENDS, checked at the public boundary; possibly
    "auto") means for tensors on ``device``."""
    if backend == "triton":
        from .vocab_triton import INTERPRETED  # whether its kernels were built for the interpreter
        checks.check_triton_device(device, "backend='triton'", INTERPRETED)
        return backend
    if backend == "fused":
        checks.check_triton_device(device, "backend='fused'")
        return backend
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        from . import native
        return "native" if native.available() else "torch"
    return "torch"


def get_backend(device: torch.device, options: BackendOptions, *, V: int,
                lengths: list[int]) -> Backend:
    """The backend ``options.backend`` names for tensors on ``device``, for one call (V: the
    vocabulary size, lengths: tokens per sequence, which the logits chunks follow). The options'
    values are checked at the public boundary; here, that the concrete backend reads them."""
    name = resolve(options.backend, device)
    checks.check_backend_options(options, name)
    if name == "fused":
        # deterministic=True is checked above and holds as it is: the fused backward is atomics-free
        return FusedBackend(options)
    if name == "reference":
        return ReferenceBackend(options)
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
    chunk = options.chunk_size or chunked.default_chunk_tokens(V, device)
    return ChunkedBackend(name, vocab, options, chunk, chunked.plan_chunks(lengths, chunk))
