"""The one-pass loss computes its gradients in the forward; backward must hand out new tensors.

Handing out the saved buffers themselves (when the incoming gradient is 1) lets the caller's
in-place edits of a gradient change the next backward's result, and makes a third
``backward(retain_graph=True)`` fail ("modified by an inplace operation").
"""
from __future__ import annotations

import pytest
import torch

import reference as ref
from reference import single_thread  # noqa: F401  (autouse fixture)
from opo_kernels import fused_policy_loss

ONE_PASS = ref.backends("torch", "triton", "native")



def _loss(bt, h, w, b, backend):
    return fused_policy_loss(h, w, bt.targets, bt.advantages, bt.old_logps, bt.mask, bias=b,
                             backend=backend)[0]


@pytest.mark.parametrize("backend", ONE_PASS)
def test_retained_graph_backward_three_times(backend):
    bt = ref.make_batch("bt", seed=3)
    h, w, b = (t.clone().requires_grad_(True) for t in (bt.hidden, bt.weight, bt.bias))
    loss = _loss(bt, h, w, b, backend)
    loss.backward(retain_graph=True)
    once = [t.grad.clone() for t in (h, w, b)]
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    for t, g in zip((h, w, b), once):
        torch.testing.assert_close(t.grad, 3 * g, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ONE_PASS)
def test_editing_a_returned_gradient_changes_nothing_saved(backend):
    bt = ref.make_batch("bt", seed=4)
    h, w, b = (t.clone().requires_grad_(True) for t in (bt.hidden, bt.weight, bt.bias))
    loss = _loss(bt, h, w, b, backend)
    g1 = torch.autograd.grad(loss, [h, w, b], retain_graph=True)
    want = [g.clone() for g in g1]
    for g in g1:
        g.mul_(10.0)  # e.g. an in-place gradient scaling or clipping
    g2 = torch.autograd.grad(loss, [h, w, b], retain_graph=True)
    for got, exp in zip(g2, want):
        assert torch.equal(got, exp)
    # With an incoming gradient other than 1 as well.
    g3 = torch.autograd.grad(2.0 * loss, [h, w, b])
    for got, exp in zip(g3, want):
        torch.testing.assert_close(got, 2 * exp, rtol=1e-6, atol=1e-7)
