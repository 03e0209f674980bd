"""−inf logits (a −inf bias: a vocabulary entry forbidden by the caller) have probability 0.

They must add 0 to the entropy and to every gradient, on every backend — never 0·(−inf) = NaN —
including when the entropy is part of the objective.
"""
from __future__ import annotations

import pytest
import torch

import reference as ref
from reference import single_thread  # noqa: F401  (autouse fixture)
from opo_kernels import fused_policy_loss, linear_logprobs

BACKENDS = ref.backends("torch", "reference", "triton", "fused", "native")



def _data(seed=0, N=10, H=16, V=300):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    b = torch.randn(V, generator=g) * 0.5
    t = torch.randint(0, V, (N,), generator=g)
    forbid = torch.ones(V, dtype=torch.bool)
    forbid[t] = False
    forbid[:3] = False
    # Forbid most of the vocabulary, including whole tiles and splits of the fused kernels.
    b[forbid & (torch.rand(V, generator=g) < 0.8)] = float("-inf")
    b[100:260] = float("-inf")
    b[t] = 0.1
    return h, w, b, t


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits_entropy_and_gradients(backend, temperature):
    h, w, b, t = _data()
    hl, wl = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp, ent = linear_logprobs(hl, wl, t, bias=b, temperature=temperature, return_entropy=True,
                              backend=backend)
    (lp.sum() + 0.3 * ent.sum()).backward()
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    lp64, ent64 = ref.logprobs(h64, w64, t, b, temperature)
    (lp64.sum() + 0.3 * ent64.sum()).backward()
    for name, got, want in (("logp", lp, lp64), ("entropy", ent, ent64), ("dhidden", hl.grad, h64.grad),
                            ("dweight", wl.grad, w64.grad)):
        assert torch.isfinite(got).all(), f"{backend}: {name} not finite"
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{backend} {name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits_in_the_loss(backend):
    h, w, b, t = _data(seed=1, N=12)
    hl = h.clone().requires_grad_(True)
    loss, m = fused_policy_loss(hl.view(3, 4, -1), w, t.view(3, 4), torch.tensor([1.0, -0.5, 0.2]),
                                torch.full((3, 4), -2.0), bias=b, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(m["entropy"]) and torch.isfinite(hl.grad).all()
