"""The two autograd functions, written against the :class:`opo_kernels.dispatch.Backend` interface.

* :class:`LinearLogprobs` — ``hidden, weight, bias -> (logp, entropy)``: ``backend.logprobs`` in
  the forward, ``backend.grads`` (which recomputes the logits) in the backward.
* :class:`OnePassLoss` — ``hidden, weight, bias -> (loss, metric sums, entropy sum)`` for backends
  with ``one_pass``: the forward computes the loss and its gradients together; the backward
  returns them scaled by the incoming gradient, always as new tensors (the saved ones stay
  private, so a retained graph can run backward again and a caller may modify what it got).
"""
from __future__ import annotations

import torch


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
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
        g_ent = None if g_ent is None else g_ent.float().contiguous()
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh, dw, db = ctx.backend.grads(hidden, weight, bias, targets, lse, ent, g_logp, g_ent,
                                       need_h, need_w, need_b and bias is not None)
        return dh, dw, db, None, None


class OnePassLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, backend, la):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        loss, sums, ent_sum, dh, dw, db = backend.one_pass_loss(hidden, weight, bias, la,
                                                                need_h, need_w, need_b)
        if dw is not None and weight.dtype != torch.float32:
            dw = dw.to(weight.dtype)
        if db is not None and bias.dtype != torch.float32:
            db = db.to(bias.dtype)
        ctx.save_for_backward(dh, dw, db)
        ctx.mark_non_differentiable(sums, ent_sum)
        return loss, sums, ent_sum

    @staticmethod
    def backward(ctx, g_loss, _g_sums, _g_ent):
        # The gradients were formed for d(loss) = 1. A product is a new tensor: never hand out
        # the saved buffers themselves.
        return tuple(None if t is None else t * g_loss.to(t.dtype)
                     for t in ctx.saved_tensors) + (None, None)
