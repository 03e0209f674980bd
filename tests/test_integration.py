"""The public API where users call it: determinism and on-policy anchoring, batch invariance,
all-masked batches, non-contiguous inputs, gradient scaling, frozen heads, no-grad anchor passes,
``torch.compile``, autocast, the ``nn.Module`` forms, and a short anchored training loop — each
checked against the float64 reference of ``tests/reference.py`` where a value is involved.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import reference as ref
from reference import single_thread  # noqa: F401  (autouse fixture)
from opo_kernels import (LOSSES, FusedOPOLoss, FusedPolicyLoss, fused_opo_loss, fused_policy_loss,
                         group_advantages, linear_logprobs)


def _native_available() -> bool:
    try:
        return bool(importlib.import_module("opo_kernels.native").available())
    except ImportError:
        return False


NATIVE = _native_available()
# Backends that promise a deterministic, batch-invariant forward (contract: Numerics).
DET_BACKENDS = ["torch",
                pytest.param("native", marks=pytest.mark.skipif(not NATIVE, reason="native CPU op unavailable"))]
CPU_BACKENDS = DET_BACKENDS + ["reference"]

FP32 = dict(rtol=1e-4, atol_rel=1e-5)
BF16 = dict(rtol=2e-2, atol_rel=1e-2)


def assert_close(got, want, *, rtol, atol_rel, what=""):
    g, w = got.detach().double(), want.detach().double()
    assert g.shape == w.shape, f"{what}: shape {tuple(g.shape)} != {tuple(w.shape)}"
    assert torch.isfinite(g).all(), f"{what}: non-finite"
    scale = w.abs().max().item() if w.numel() else 0.0
    err = (g - w).abs()
    ok = err <= rtol * w.abs() + atol_rel * scale + 1e-30
    assert bool(ok.all()), f"{what}: max |err| {err.max().item():.3g} at scale {scale:.3g}"


def leaves(bt, weight_grad=True):
    h = bt.hidden.detach().clone().requires_grad_(True)
    w = bt.weight.detach().clone().requires_grad_(weight_grad)
    b = None if bt.bias is None else bt.bias.detach().clone().requires_grad_(weight_grad)
    return h, w, b


def clean_targets(bt):
    """bt.targets with the junk at masked positions replaced by ignore_index (for linear_logprobs,
    which has no mask)."""
    t = bt.targets
    return torch.where((t < 0) | (t >= bt.V), torch.full_like(t, -100), t)


def fused(bt, h, w, b, old="batch", **kw):
    old_logps = bt.old_logps if isinstance(old, str) else old
    return fused_policy_loss(h, w, bt.targets, bt.advantages, old_logps, bt.mask, bias=b,
                             **bt.layout_kw, **kw)


# ------------------------------------------------------------------------------------------------
# Determinism and on-policy anchoring
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", DET_BACKENDS)
@pytest.mark.parametrize("options", [{}, {"level": "token", "ratio": "exact"}, {"loss": "gspo"},
                                     {"escort": "group_softmax", "group_size": 3}, {"loss": "dapo"}],
                         ids=["opo", "token_exact", "gspo", "group_softmax", "dapo"])
@pytest.mark.parametrize("layout,chunk_size", [("bt", 3), ("cu", 5), ("ids", None)])
def test_two_runs_are_bitwise_equal(layout, chunk_size, options, backend):
    bt = ref.make_batch(layout, seed=21)
    outs = []
    for _ in range(2):
        h, w, b = leaves(bt)
        loss, metrics = fused(bt, h, w, b, backend=backend, chunk_size=ref.chunk_for(backend, chunk_size), **options)
        loss.backward()
        outs.append((loss.detach(), metrics, h.grad, w.grad, b.grad))
    (l1, m1, *g1), (l2, m2, *g2) = outs
    assert torch.equal(l1, l2)
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    assert all(torch.equal(x, y) for x, y in zip(g1, g2))


@pytest.mark.parametrize("backend", DET_BACKENDS)
@pytest.mark.parametrize("layout", ["bt", "cu", "ids"])
def test_on_policy_anchor_gives_exact_zero_delta(layout, backend):
    """Anchor from linear_logprobs under no_grad on the same weights: Δ = 0 exactly, whatever the
    chunk sizes of the anchor pass and of the loss (contract: Numerics: deterministic, batch-invariant)."""
    bt = ref.make_batch(layout, junk_masked=False, seed=22)
    for anchor_chunk in (None, 3, 16):
        with torch.no_grad():
            anchor = linear_logprobs(bt.hidden, bt.weight, bt.targets, bias=bt.bias,
                                     backend=backend, chunk_size=ref.chunk_for(backend, anchor_chunk), **bt.layout_kw)
        assert anchor.grad_fn is None
        for loss_chunk in (None, 3, 5, 16):
            for options in ({}, {"level": "token", "ratio": "exact"}, {"loss": "gspo"}):
                h, w, b = leaves(bt)
                loss, m = fused(bt, h, w, b, old=anchor, backend=backend, chunk_size=ref.chunk_for(backend, loss_chunk),
                                **options)
                tag = f"anchor chunk {anchor_chunk}, loss chunk {loss_chunk}, {options}"
                assert m["delta_abs_mean"].item() == 0.0, f"{tag}: |Δ| = {m['delta_abs_mean'].item()}"
                assert m["chi2"].item() == 0.0, tag
                if options.get("loss") == "gspo":
                    assert m["clip_frac"].item() == 0.0, tag


def _triton_ok():
    try:
        importlib.import_module("opo_kernels.vocab_triton")
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not _triton_ok(), reason="opo_kernels.vocab_triton does not import")
@pytest.mark.parametrize("layout", ["bt", "cu"])
def test_triton_deterministic_and_on_policy(layout):
    bt = ref.make_batch(layout, junk_masked=False, seed=34)
    with torch.no_grad():
        anchor = linear_logprobs(bt.hidden, bt.weight, bt.targets, bias=bt.bias, backend="triton",
                                 chunk_size=3, **bt.layout_kw)
    outs = []
    for chunk in (5, 5, None):
        h, w, b = leaves(bt)
        loss, m = fused(bt, h, w, b, old=anchor, backend="triton", chunk_size=chunk, loss="gspo")
        loss.backward()
        assert m["delta_abs_mean"].item() == 0.0, f"chunk {chunk}: |Δ| = {m['delta_abs_mean'].item()}"
        outs.append((loss.detach(), h.grad, w.grad, b.grad))
    assert all(torch.equal(x, y) for x, y in zip(outs[0], outs[1]))


@pytest.mark.skipif(not NATIVE, reason="native CPU op unavailable")
def test_native_multithreaded_is_deterministic():
    """The native op parallelizes over rows with OpenMP: with 2 threads results stay bitwise
    reproducible and on-policy Δ stays exactly 0. (Results across different thread counts are not
    compared: the BLAS GEMMs themselves may sum in another order with another thread count.)"""
    bt = ref.make_batch("cu", junk_masked=False, seed=35, lengths=[9, 0, 14, 20, 3, 11])
    n = torch.get_num_threads()
    outs = []
    try:
        for threads in (2, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                anchor = linear_logprobs(bt.hidden, bt.weight, bt.targets, bias=bt.bias,
                                         backend="native", **bt.layout_kw)
            h, w, b = leaves(bt)
            loss, m = fused(bt, h, w, b, old=anchor, backend="native", chunk_size=16)
            loss.backward()
            assert m["delta_abs_mean"].item() == 0.0
            outs.append((anchor, loss.detach(), h.grad, w.grad, b.grad))
    finally:
        torch.set_num_threads(n)
    for other in outs[1:]:
        for x, y in zip(outs[0], other):
            assert torch.equal(x, y)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_on_policy_anchor_matches_old_none(backend):
    """With an exact on-policy anchor the loss and gradients equal those of old_logps=None."""
    bt = ref.make_batch("cu", junk_masked=False, seed=23)
    with torch.no_grad():
        anchor = linear_logprobs(bt.hidden, bt.weight, bt.targets, bias=bt.bias, backend=backend,
                                 **bt.layout_kw)
    res = []
    for old in (anchor, None):
        h, w, b = leaves(bt)
        loss, m = fused(bt, h, w, b, old=old, backend=backend, mu=3.0)
        loss.backward()
        res.append((loss.detach(), h.grad, w.grad))
    want = ref.reference_loss(bt, {"mu": 3.0}, old=None)
    assert abs(res[0][0].item() - want["loss"].item()) <= 1e-4 * abs(want["loss"].item()) + 2e-6
    assert torch.equal(res[0][0], res[1][0])
    for a, c, name in zip(res[0][1:], res[1][1:], ("hidden", "weight")):
        assert_close(a, c, rtol=1e-6, atol_rel=1e-7, what=f"d{name}")
    assert_close(res[0][1], want["grads"][0], **FP32, what="dhidden vs reference")


@pytest.mark.parametrize("backend", DET_BACKENDS)
def test_linear_logprobs_batch_invariant_large_batches(backend):
    """A row's log-prob is bitwise the same inside any batch of >= 16 rows."""
    g = torch.Generator().manual_seed(24)
    N, H, V = 64, 32, 257
    h, w = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    t = torch.randint(0, V, (N,), generator=g)
    full, ent = linear_logprobs(h, w, t, backend=backend, return_entropy=True)
    for a, b in [(0, 16), (5, 21), (7, 40), (30, 64), (13, 50)]:
        sub, sub_ent = linear_logprobs(h[a:b], w, t[a:b], backend=backend, return_entropy=True)
        assert torch.equal(sub, full[a:b]), f"rows [{a}, {b}): max diff {(sub - full[a:b]).abs().max()}"
        assert torch.equal(sub_ent, ent[a:b])


@pytest.mark.parametrize("backend", DET_BACKENDS)
def test_linear_logprobs_batch_invariant_small_batches(backend):
    """The same for batches of fewer than 16 rows (a single row, a short sequence): the contract's Numerics
    promises a batch-invariant forward without a lower bound on the batch size."""
    g = torch.Generator().manual_seed(24)
    N, H, V = 64, 32, 257
    h, w = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    t = torch.randint(0, V, (N,), generator=g)
    full = linear_logprobs(h, w, t, backend=backend)
    bad = []
    for n in (1, 3, 8, 15):
        for a in range(0, N - n + 1, 7):
            sub = linear_logprobs(h[a:a + n], w, t[a:a + n], backend=backend)
            if not torch.equal(sub, full[a:a + n]):
                bad.append(((a, a + n), (sub - full[a:a + n]).abs().max().item()))
    assert not bad, f"{len(bad)} row windows differ from the full batch, e.g. {bad[:4]}"


# ------------------------------------------------------------------------------------------------
# All-masked batches, non-contiguous inputs, gradient scaling
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("options", [{"loss": name} for name in LOSSES] +
                         [{"level": "token"}, {"escort": "group_softmax", "group_size": 3},
                          {"ref_correction": True}],
                         ids=list(LOSSES) + ["token", "group_softmax", "ref_correction"])
@pytest.mark.parametrize("layout", ["bt", "cu"])
def test_all_masked_batch(layout, options, backend):
    bt = ref.make_batch(layout, seed=25)
    for how in ("mask", "ignore_index"):
        h, w, b = leaves(bt)
        if how == "mask":
            mask, targets = torch.zeros_like(bt.targets, dtype=torch.bool), bt.targets
        else:
            mask, targets = None, torch.full_like(bt.targets, -100)
        loss, m = fused_policy_loss(h, w, targets, bt.advantages, bt.old_logps, mask, bias=b,
                                    backend=backend, chunk_size=ref.chunk_for(backend, 5), **bt.layout_kw, **options)
        loss.backward()
        assert loss.item() == 0.0, f"{how}: loss {loss.item()}"
        for name, gr in (("hidden", h.grad), ("weight", w.grad), ("bias", b.grad)):
            assert gr is not None and bool((gr == 0).all()), f"{how}: d{name} not zero"
        for k, v in m.items():
            assert torch.isfinite(v), f"{how}: metric {k} = {v}"
        assert m["num_tokens"].item() == 0 and m["num_seqs"].item() == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    bt = ref.make_batch("bt", seed=26)
    B, T, H, V = bt.hidden.shape[0], bt.hidden.shape[1], bt.H, bt.V
    want = ref.reference_loss(bt, {"level": "token"})
    variants = {
        "transposed hidden": bt.hidden.transpose(0, 1).contiguous().transpose(0, 1),
        "sliced hidden": torch.cat([bt.hidden, torch.randn(B, T, 5)], -1)[..., :H],
        "hidden with strided last dim": bt.hidden.permute(2, 0, 1).contiguous().permute(1, 2, 0),
    }
    for name, hv in variants.items():
        assert not hv.is_contiguous() and torch.equal(hv, bt.hidden)
        h = hv.detach().requires_grad_(True)
        w_t = bt.weight.t().contiguous().requires_grad_(True)  # (H, V) leaf; the head is its .t()
        b = bt.bias.clone().requires_grad_(True)
        targets = torch.stack([bt.targets, bt.targets], -1)[..., 0]
        old = torch.stack([bt.old_logps, bt.old_logps], -1)[..., 1]
        mask = bt.mask.t().contiguous().t()
        assert not targets.is_contiguous() and not old.is_contiguous() and not mask.is_contiguous()
        loss, m = fused_opo_loss(h, w_t.t(), targets, bt.advantages, old, mask, bias=b,
                                 level="token", backend=backend, chunk_size=ref.chunk_for(backend, 4))
        loss.backward()
        assert abs(loss.item() - want["loss"].item()) <= 1e-4 * abs(want["loss"].item()) + 2e-6, name
        assert_close(h.grad, want["grads"][0], **FP32, what=f"{name}: dhidden")
        assert_close(w_t.grad.t(), want["grads"][1], **FP32, what=f"{name}: dweight")
        assert_close(b.grad, want["grads"][2], **FP32, what=f"{name}: dbias")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_scaling(dtype, backend):
    bt = ref.make_batch("cu", dtype, seed=27)
    grads = {}
    for scale in (1.0, 2.0, 0.37):
        h, w, b = leaves(bt)
        loss, _ = fused(bt, h, w, b, backend=backend, chunk_size=ref.chunk_for(backend, 5))
        (scale * loss).backward()
        grads[scale] = (h.grad, w.grad, b.grad)
    for g1, g2 in zip(grads[1.0], grads[2.0]):
        assert torch.equal(2 * g1, g2), "(2 * loss).backward() must give exactly twice the gradients"
    for g1, g3 in zip(grads[1.0], grads[0.37]):
        assert_close(g3, 0.37 * g1.double(), **(FP32 if dtype == torch.float32 else BF16), what="0.37")
    # The loss used twice in the graph, and next to another term.
    h, w, b = leaves(bt)
    loss, _ = fused(bt, h, w, b, backend=backend, chunk_size=ref.chunk_for(backend, 5))
    (loss + loss + 0.0 * h.sum()).backward()
    for g1, g2 in zip(grads[1.0], (h.grad, w.grad, b.grad)):
        assert torch.equal(2 * g1, g2)


# ------------------------------------------------------------------------------------------------
# Frozen head, no-grad anchor passes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_frozen_head_gives_hidden_grads_only(backend):
    bt = ref.make_batch("ids", seed=28)
    want = ref.reference_loss(bt, {})
    h, w, b = leaves(bt, weight_grad=False)
    loss, _ = fused(bt, h, w, b, backend=backend, chunk_size=ref.chunk_for(backend, 5))
    loss.backward()
    assert w.grad is None and b.grad is None
    assert_close(h.grad, want["grads"][0], **FP32, what="dhidden")
    # Only the bias trainable.
    h, w, b = leaves(bt, weight_grad=False)
    b.requires_grad_(True)
    h.requires_grad_(False)
    loss, _ = fused(bt, h, w, b, backend=backend)
    loss.backward()
    assert w.grad is None and h.grad is None
    assert_close(b.grad, want["grads"][2], **FP32, what="dbias")
    # linear_logprobs with a frozen head.
    h, w, b = leaves(bt, weight_grad=False)
    lp = linear_logprobs(h, w, clean_targets(bt), bias=b, backend=backend, **bt.layout_kw)
    lp.sum().backward()
    assert w.grad is None and h.grad is not None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_grad_passes_build_no_graph(backend):
    bt = ref.make_batch("bt", junk_masked=False, seed=29)
    h, w, b = leaves(bt)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            lp, ent = linear_logprobs(h, w, bt.targets, bias=b, backend=backend, return_entropy=True)
            loss, m = fused(bt, h, w, b, backend=backend)
            loss_ref, _ = fused(bt, h, w, b, backend=backend, ref_correction=True, old=None)
        for t in (lp, ent, loss, loss_ref, *m.values()):
            assert t.grad_fn is None and not t.requires_grad
    want = ref.logprobs(bt.hidden, bt.weight, bt.targets, bt.bias)[0]
    assert_close(lp, want, rtol=1e-5, atol_rel=1e-6, what="anchor log-probs")
    # Inputs that do not require grad, outside no_grad: no graph either.
    loss, _ = fused(bt, bt.hidden, bt.weight, bt.bias, backend=backend)
    assert loss.grad_fn is None


# ------------------------------------------------------------------------------------------------
# torch.compile, autocast, modules
# ------------------------------------------------------------------------------------------------

def test_compiled_training_step_matches_eager():
    bt = ref.make_batch("bt", junk_masked=False, seed=30)
    torch.manual_seed(0)
    body = torch.nn.Linear(16, bt.H)
    head = torch.nn.Parameter(bt.weight.clone())
    x = torch.randn(*bt.targets.shape, 16)

    def step(x):
        h = torch.tanh(body(x))
        loss, metrics = fused_opo_loss(h, head, bt.targets, bt.advantages, bt.old_logps, bt.mask,
                                       bias=bt.bias, level="token", mu=2.0)
        return loss * 1.0, metrics["delta_abs_mean"]

    params = [body.weight, body.bias, head]
    results = []
    for fn in (torch.compile(step), step):
        for p in params:
            p.grad = None
        loss, dabs = fn(x)
        loss.backward()
        results.append((loss.detach(), dabs, [p.grad.clone() for p in params]))
    (lc, dc, gc), (le, de, ge) = results
    assert abs(lc.item() - le.item()) <= 1e-6 * abs(le.item()) + 1e-7
    assert dc.item() == pytest.approx(de.item(), rel=1e-6)
    for a, c in zip(gc, ge):
        assert_close(a, c, rtol=1e-5, atol_rel=1e-6, what="compiled grad")
    # And the eager step against the float64 reference on the same hidden states.
    with torch.no_grad():
        h = torch.tanh(body(x))
    bt.hidden = h
    want = ref.reference_loss(bt, {"level": "token", "mu": 2.0})
    assert abs(le.item() - want["loss"].item()) <= 1e-4 * abs(want["loss"].item()) + 2e-6
    assert_close(ge[2], want["grads"][1], **FP32, what="dweight")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("options", [{}, {"loss": "grpo"}], ids=["opo", "grpo"])
def test_autocast_bf16(options, backend):
    bt = ref.make_batch("bt", seed=31)
    h, w, b = leaves(bt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, m = fused(bt, h, w, b, backend=backend, **options)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    for name, g in (("hidden", h.grad), ("weight", w.grad), ("bias", b.grad)):
        assert g is not None and g.dtype == torch.float32 and torch.isfinite(g).all(), name
    # The reference on the bf16-rounded head inputs (what autocast feeds the kernels).
    rb = ref.make_batch("bt", seed=31)
    rb.hidden, rb.weight, rb.bias = (t.bfloat16() for t in (bt.hidden, bt.weight, bt.bias))
    want = ref.reference_loss(rb, options)
    assert abs(loss.item() - want["loss"].item()) <= 1e-3 * abs(want["loss"].item()) + 1e-5
    for name, g, r in zip(("hidden", "weight", "bias"), (h.grad, w.grad, b.grad), want["grads"]):
        assert_close(g, r, **BF16, what=f"autocast d{name}")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = linear_logprobs(h, w, clean_targets(bt), bias=b, backend=backend)
    assert lp.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_modules(backend):
    bt = ref.make_batch("cu", seed=32)
    mod = FusedOPOLoss(alpha=0.3, level="token", backend=backend, chunk_size=ref.chunk_for(backend, 5))
    assert "alpha=0.3" in repr(mod)
    h, w, b = leaves(bt)
    loss, m = mod(h, w, bt.targets, bt.advantages, bt.old_logps, bt.mask, bias=b, **bt.layout_kw)
    loss.backward()
    want = ref.reference_loss(bt, {"alpha": 0.3, "level": "token"})
    assert abs(loss.item() - want["loss"].item()) <= 1e-4 * abs(want["loss"].item()) + 2e-6
    assert_close(h.grad, want["grads"][0], **FP32, what="module dhidden")
    # A forward keyword overrides the module's option for that call only.
    l2, _ = mod(bt.hidden, bt.weight, bt.targets, bt.advantages, bt.old_logps, bt.mask,
                bias=bt.bias, level="sequence", **bt.layout_kw)
    want2 = ref.reference_loss(bt, {"alpha": 0.3}, grads=False)
    assert abs(l2.item() - want2["loss"].item()) <= 1e-4 * abs(want2["loss"].item()) + 2e-6
    assert mod.options["level"] == "token"
    gspo = FusedPolicyLoss(loss="gspo", clip_eps_low=0.05, clip_eps_high=0.08, backend=backend)
    l3, m3 = gspo(bt.hidden, bt.weight, bt.targets, bt.advantages, bt.old_logps, bt.mask,
                  bias=bt.bias, **bt.layout_kw)
    want3 = ref.reference_loss(bt, {"loss": "gspo", "clip_eps_low": 0.05, "clip_eps_high": 0.08},
                               grads=False)
    assert abs(l3.item() - want3["loss"].item()) <= 1e-4 * abs(want3["loss"].item()) + 2e-6
    assert "clip_frac" in m3
    assert isinstance(mod, torch.nn.Module) and list(mod.parameters()) == []


# ------------------------------------------------------------------------------------------------
# A short anchored training loop (paper §8 mini-batch anchoring)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", DET_BACKENDS)
def test_anchored_minibatch_steps(backend):
    """Rewards -> group advantages -> anchor pass -> several SGD steps on the head. The first
    step is on-policy (Δ = 0 exactly); later ones see Δ ≠ 0 and match the reference."""
    bt = ref.make_batch("cu", junk_masked=False, seed=33, lengths=[4, 6, 0, 5, 3, 7])
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    bt.advantages = group_advantages(rewards, 3)
    assert_close(bt.advantages, ref.group_advantages(rewards, 3), rtol=1e-6, atol_rel=1e-7,
                 what="advantages")
    w = bt.weight.detach().clone().requires_grad_(True)
    h = bt.hidden.detach().clone().requires_grad_(True)
    with torch.no_grad():
        anchor = linear_logprobs(h, w, bt.targets, bias=bt.bias, backend=backend, **bt.layout_kw)
    bt.old_logps = anchor
    opt = torch.optim.SGD([w, h], lr=0.5)
    losses = []
    for step in range(3):
        opt.zero_grad()
        loss, m = fused_opo_loss(h, w, bt.targets, bt.advantages, anchor, bt.mask, bias=bt.bias,
                                 backend=backend, chunk_size=ref.chunk_for(backend, 8), **bt.layout_kw)
        loss.backward()
        if step == 0:
            assert m["delta_abs_mean"].item() == 0.0
        else:
            assert m["delta_abs_mean"].item() > 0.0
            cur = ref.make_batch("cu", junk_masked=False, seed=33, lengths=[4, 6, 0, 5, 3, 7])
            cur.hidden, cur.weight = h.detach().clone(), w.detach().clone()
            cur.advantages, cur.old_logps = bt.advantages, anchor
            want = ref.reference_loss(cur, {})
            assert abs(loss.item() - want["loss"].item()) <= 1e-4 * abs(want["loss"].item()) + 2e-6
            assert_close(w.grad, want["grads"][1], **FP32, what=f"step {step} dweight")
            assert_close(h.grad, want["grads"][0], **FP32, what=f"step {step} dhidden")
        losses.append(loss.item())
        opt.step()
    assert losses[1] < losses[0], f"the loss should go down along its gradient: {losses}"
