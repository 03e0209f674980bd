"""The two autograd functions, written against the :class:`opo_kernels.dispatch.Backend` interface.

* :class:`LinearLogprobs` — ``hidden, weight, bias -> (logp, entropy)``: ``backend.logprobs`` in
  the forward, ``backend.grads`` (which recomputes the logits) in the backward.
* :class:`OnePassLoss` — ``hidden, weight, bias -> (loss, metric sums, entropy sum)`` for backends
  with ``one_pass``: the forward computes the loss and its gradients together; the backward
  hands them out scaled by the incoming gradient and keeps no reference to them (no extra
  copy of dweight: a caller may modify what it got); a second backward through a retained graph
  computes them again.

Neither backward is differentiable: after ``create_graph=True`` the gradients they return raise a
RuntimeError when differentiated, instead of contributing a silent zero Hessian.
"""
from __future__ import annotations

import torch

from .dispatch import Needs, UpstreamGrad

_SECOND_ORDER = (b"opo_kernels: the gradient of the fused loss / linear_logprobs is computed by the "
                 b"kernels and is not differentiable (no second order, no create_graph=True "
                 b"through it); for higher-order terms use policy_loss on log-probs")


def _no_second_order(grads, inputs):
    """``grads`` as they are, or, in a backward with ``create_graph=True``, copies that raise a
    RuntimeError when differentiated (never a silent zero Hessian). ``inputs``: the function's
    differentiable inputs, linked to the copies so that a gradient taken w.r.t. them reaches the
    error."""
    if not torch.is_grad_enabled():
        return grads
    live = [g for g in grads if g is not None]
    links = [t for t in inputs if t is not None and t.requires_grad]
    if not live:
        return grads
    args = [g.detach().requires_grad_() for g in live] + links
    out = torch._C._functions.DelayedError(_SECOND_ORDER, len(args))(*args)
    out = iter((out,) if isinstance(out, torch.Tensor) else out)
    return [None if g is None else next(out) for g in grads]


class LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, backend):
        logp, lse, ent = backend.logprobs(hidden, weight, bias, targets)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.backend = backend
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        if g_logp is None and g_ent is None:
            return None, None, None, None, None
        with torch.no_grad():
            g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
            g_ent = None if g_ent is None else g_ent.float().contiguous()
            need_h, need_w, need_b = ctx.needs_input_grad[:3]
            dh, dw, db = ctx.backend.grads(hidden, weight, bias, targets,
                                           UpstreamGrad(lse, ent, g_logp, g_ent),
                                           Needs(need_h, need_w, need_b and bias is not None))
        return (*_no_second_order([dh, dw, db], [hidden, weight, bias]), None, None)


def _one_pass(backend, hidden, weight, bias, la, needs):
    """The backend's one-pass loss, with the gradients in the dtypes of weight and bias."""
    loss, sums, ent_sum, dh, dw, db = backend.one_pass_loss(hidden, weight, bias, la, needs)
    if dw is not None and weight.dtype != torch.float32:
        dw = dw.to(weight.dtype)
    if db is not None and bias.dtype != torch.float32:
        db = db.to(bias.dtype)
    return loss, sums, ent_sum, [dh, dw, db]


class OnePassLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, backend, la):
        needs = Needs(ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                      bias is not None and ctx.needs_input_grad[2])
        loss, sums, ent_sum, grads = _one_pass(backend, hidden, weight, bias, la, needs)
        # The gradients are kept outside save_for_backward: the first backward hands them out
        # (they are nobody else's), so a caller may modify them; a later backward through a
        # retained graph computes them again from the saved inputs.
        ctx.grads = grads
        ctx.save_for_backward(hidden, weight, bias)
        ctx.backend, ctx.la, ctx.needs = backend, la, needs
        ctx.mark_non_differentiable(sums, ent_sum)
        return loss, sums, ent_sum

    @staticmethod
    def backward(ctx, g_loss, _g_sums, _g_ent):
        grads, ctx.grads = ctx.grads, None
        with torch.no_grad():
            if grads is None:
                hidden, weight, bias = ctx.saved_tensors
                grads = _one_pass(ctx.backend, hidden, weight, bias, ctx.la, ctx.needs)[3]
            # The gradients were formed for d(loss) = 1; scale them (in place: they are ours to give).
            unit = g_loss.device.type == "cpu" and g_loss.item() == 1.0
            if not unit:
                grads = [None if t is None else t.mul_(g_loss.to(t.dtype)) for t in grads]
        grads = _no_second_order(grads, ctx.saved_tensors)
        return grads[0], grads[1], grads[2], None, None
