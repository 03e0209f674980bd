"""Batch invariance of the CPU forward at real hidden sizes, and Δ ≡ 0 for an on-policy anchor.

A BLAS picks its sgemm kernel (and so the order of a row's sum) by the number of rows: at
H ≥ 1024 a sequence's log-probs alone and inside a batch could differ in the last bits, and an
anchor taken over the whole rollout batch then gives Δ ≠ 0 on a slice of it. The chunked path
runs every logits GEMM on a fixed number of rows, which the first test checks directly (on any
BLAS); the others check the bits.
"""
from __future__ import annotations

import pytest
import torch

import reference as ref
from reference import single_thread  # noqa: F401  (autouse fixture)
from opo_kernels import fused_policy_loss, linear_logprobs
from opo_kernels import chunked
from opo_kernels.chunked import GEMM_ROWS

CHUNKED = ref.backends("torch", "native")



def _data(N, H, V=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * H ** -0.5,
            torch.randint(0, V, (N,), generator=g))


def test_every_logits_gemm_has_the_same_row_count(monkeypatch):
    """Alone, in a batch, with any chunk_size: the logits GEMMs all see GEMM_ROWS rows."""
    h, w, t = _data(300, 64, V=500)
    seen = []
    mm, addmm = torch.mm, torch.addmm

    def spy_mm(a, b, *args, **kw):
        if b.shape == (64, 500):
            seen.append(a.shape[0])
        return mm(a, b, *args, **kw)

    def spy_addmm(c, a, b, *args, **kw):
        if b.shape == (64, 500):
            seen.append(a.shape[0])
        return addmm(c, a, b, *args, **kw)

    monkeypatch.setattr(torch, "mm", spy_mm)
    monkeypatch.setattr(torch, "addmm", spy_addmm)
    with torch.no_grad():
        for n, chunk in ((7, None), (300, None), (300, 32), (300, 200), (1, 5)):
            linear_logprobs(h[:n], w, t[:n], backend="torch", chunk_size=chunk)
            linear_logprobs(h[:n], w, t[:n], bias=torch.zeros(500), backend="torch", chunk_size=chunk)
    assert seen and set(seen) == {GEMM_ROWS}, sorted(set(seen))


@pytest.mark.parametrize("H", [1024, 2048])
@pytest.mark.parametrize("backend", CHUNKED)
def test_alone_equals_in_batch_bitwise(backend, H):
    h, w, t = _data(200, H)
    with torch.no_grad():
        full = linear_logprobs(h, w, t, backend=backend)
        for a, b in ((50, 57), (0, 1), (193, 200), (120, 136)):
            alone = linear_logprobs(h[a:b].clone(), w, t[a:b].clone(), backend=backend)
            assert torch.equal(alone, full[a:b]), f"rows {a}:{b}: {(alone - full[a:b]).abs().max()}"
        for chunk in (32, 64, 100):
            other = linear_logprobs(h, w, t, backend=backend, chunk_size=chunk)
            assert torch.equal(other, full), f"chunk_size={chunk}: {(other - full).abs().max()}"


@pytest.mark.parametrize("backend", CHUNKED)
def test_anchor_over_the_batch_gives_zero_delta_on_a_slice(backend):
    """The anchor of the whole rollout batch (16 × 13 tokens, H = 1024), the loss on a mini-batch
    of 4 sequences with another chunk_size: Δ = 0 exactly."""
    B, T, H = 16, 13, 1024
    h, w, t = _data(B * T, H, seed=3)
    h, t = h.view(B, T, H), t.view(B, T)
    with torch.no_grad():
        anchor = linear_logprobs(h, w, t, backend=backend)
    adv = torch.randn(B, generator=torch.Generator().manual_seed(4))
    for s0, chunk in ((4, None), (8, 16), (12, 40)):
        hs = h[s0:s0 + 4].clone().requires_grad_(True)
        _, m = fused_policy_loss(hs, w, t[s0:s0 + 4], adv[s0:s0 + 4], anchor[s0:s0 + 4],
                                 backend=backend, chunk_size=chunk)
        assert m["delta_abs_mean"].item() == 0.0, f"slice {s0}, chunk {chunk}: |Δ| = {m['delta_abs_mean']}"


@pytest.mark.parametrize("V", [32000, 65536, 128256, 151936, 262144])
def test_default_chunk_does_not_shrink_with_the_vocabulary(V):
    """At real vocabularies a chunk still holds several GEMM blocks (a 64- or 128-token chunk
    re-reads the whole weight per block and ran 2x the GEMM floor at V = 151936), and a chunk of
    logits stays a small fraction of the materializing loss (N x V fp32, twice) at N = 1024."""
    cpu = torch.device("cpu")
    chunk = chunked.default_chunk_tokens(V, cpu)
    assert chunk >= 512 and chunk % chunked.GEMM_ROWS == 0
    assert chunk & (chunk - 1) == 0
    assert chunk * V * 4 <= 0.25 * (2 * 1024 * V * 4)
