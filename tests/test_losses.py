"""Every loss option of the public API against the float64 reference of ``tests/reference.py``.

The fused losses (loss value, metrics, gradients of hidden, weight and bias) for the CPU backends
(torch, reference, native when it builds), fp32 and bf16, (B, T, H) and packed inputs, several
chunk sizes (chunks of several sequences, and sequences longer than the chunk: the two-phase
sub-chunk path); then ``linear_logprobs``, ``policy_loss`` / ``opo_loss`` from per-token
log-probs, ``escort_weights`` and ``group_advantages``; then the Triton backend under
``TRITON_INTERPRET=1`` at a few representative option sets.
"""
from __future__ import annotations

import functools
import importlib
import os

import pytest
import torch

import reference as ref
from reference import single_thread  # noqa: F401  (autouse fixture)
from opo_kernels import (escort_weights, fused_opo_loss, fused_policy_loss, group_advantages,
                         linear_logprobs, opo_loss, policy_loss)


def _native_available() -> bool:
    try:
        native = importlib.import_module("opo_kernels.native")
    except ImportError:
        return False
    return bool(native.available())


NATIVE = _native_available()
CPU_BACKENDS = ["torch", "reference",
                pytest.param("native", marks=pytest.mark.skipif(not NATIVE, reason="native CPU op unavailable"))]

OPO_CASES = {
    "default": {},
    "token": {"level": "token"},
    "sum": {"seq_reduce": "sum"},
    "exact": {"ratio": "exact"},
    "center": {"normalize": "center"},
    "group3": {"norm_scope": "group", "group_size": 3},
    "group2_center_token": {"norm_scope": "group", "group_size": 2, "normalize": "center", "level": "token"},
    "refcorr": {"ref_correction": True},
    "refcorr_sum_token_group": {"ref_correction": True, "seq_reduce": "sum", "level": "token",
                                "norm_scope": "group", "group_size": 3},
    "clamp": {"max_log_ratio": 0.05},
    "clamp_exact_token": {"max_log_ratio": 0.1, "ratio": "exact", "level": "token"},
    "alpha0_mu_tau": {"alpha": 0.0, "mu": 2.5, "tau": 0.5},
    "alpha1_exact_sum": {"alpha": 1.0, "ratio": "exact", "seq_reduce": "sum"},
    "gsm": {"escort": "group_softmax", "group_size": 3},
    "gsm_fixed_tau": {"escort": "group_softmax", "group_size": 2, "adaptive_tau": False, "tau": 0.8},
    "gsm_clamp": {"escort": "group_softmax", "group_size": 3, "max_log_ratio": 0.05, "alpha": 0.6,
                  "beta_r": 0.3, "mu": 2.0},
}
BASELINE_CASES = {
    "grpo": {"loss": "grpo"},
    "grpo_eps": {"loss": "grpo", "clip_eps_low": 0.1, "clip_eps_high": 0.3},
    "dapo": {"loss": "dapo"},
    "gspo": {"loss": "gspo"},
    "gspo_wide": {"loss": "gspo", "clip_eps_low": 0.05, "clip_eps_high": 0.08},
    "dr_grpo": {"loss": "dr_grpo"},
    "dr_grpo_mcl": {"loss": "dr_grpo", "max_completion_length": 20},
}
CASES = {**OPO_CASES, **BASELINE_CASES}
# Cases that also run with a temperature != 1 (the vocabulary side of the options).
TEMPERATURE = {"default": 0.7, "exact": 1.3, "dapo": 1.3, "gsm": 0.7, "gspo_wide": 0.7}

FP32_TOL = dict(rtol=1e-4, atol_rel=1e-5)
BF16_TOL = dict(rtol=2e-2, atol_rel=1e-2)


def assert_close(got, want, *, rtol, atol_rel, what=""):
    """|got - want| <= rtol·|want| + atol_rel·max|want| elementwise (float64 comparison)."""
    assert got is not None, f"{what}: got None"
    g = got.detach().double().cpu()
    w = want.detach().double().cpu()
    assert g.shape == w.shape, f"{what}: shape {tuple(g.shape)} != {tuple(w.shape)}"
    assert torch.isfinite(g).all(), f"{what}: non-finite values"
    scale = w.abs().max().item() if w.numel() else 0.0
    err = (g - w).abs()
    bound = rtol * w.abs() + atol_rel * scale + 1e-30
    if not bool((err <= bound).all()):
        k = int((err - bound).argmax())
        raise AssertionError(f"{what}: max excess at flat index {k}: got {g.reshape(-1)[k].item():.9g}, "
                             f"want {w.reshape(-1)[k].item():.9g} (max |err| {err.max().item():.3g}, "
                             f"scale {scale:.3g})")


def assert_metrics(got: dict, want: dict, rtol=1e-4, atol=1e-6, what=""):
    for k, v in want.items():
        if k == "tau_eff":
            continue
        assert k in got, f"{what}: metric {k!r} missing from {sorted(got)}"
        t = got[k]
        assert isinstance(t, torch.Tensor) and t.dim() == 0 and not t.requires_grad, \
            f"{what}: metric {k} must be a detached 0-d tensor, got {t!r}"
        g = float(t)
        assert abs(g - v) <= rtol * abs(v) + atol, f"{what}: metric {k}: got {g!r}, want {v!r}"


@functools.lru_cache(maxsize=None)
def _batch(layout, dtype, bias, temperature, seed=0):
    return ref.make_batch(layout, dtype, bias=bias, temperature=temperature, seed=seed)


@functools.lru_cache(maxsize=None)
def _reference(case, layout, dtype, bias, temperature):
    return ref.reference_loss(_batch(layout, dtype, bias, temperature), CASES[case],
                              temperature=temperature)


def _leaves(bt):
    h = bt.hidden.detach().clone().requires_grad_(True)
    w = bt.weight.detach().clone().requires_grad_(True)
    b = None if bt.bias is None else bt.bias.detach().clone().requires_grad_(True)
    return h, w, b


def run_fused(bt, options, *, backend, chunk_size=None, temperature=1.0):
    """Call fused_policy_loss on fresh leaves; returns (loss, metrics, (dh, dw, db))."""
    h, w, b = _leaves(bt)
    loss, metrics = fused_policy_loss(h, w, bt.targets, bt.advantages, bt.old_logps, bt.mask,
                                      bias=b, backend=backend, chunk_size=ref.chunk_for(backend, chunk_size),
                                      temperature=temperature, **bt.layout_kw, **options)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    return loss, metrics, (h.grad, w.grad, None if b is None else b.grad)


def check_against_reference(case, layout, dtype, backend, chunk_size, temperature=1.0, bias=True):
    bt = _batch(layout, dtype, bias, temperature)
    want = _reference(case, layout, dtype, bias, temperature)
    loss, metrics, grads = run_fused(bt, CASES[case], backend=backend, chunk_size=ref.chunk_for(backend, chunk_size),
                                     temperature=temperature)
    tag = f"{case}/{layout}/{dtype}/{backend}/chunk={chunk_size}/T={temperature}"
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    # The loss is a sum of terms of both signs: compare it at the scale of its largest term.
    assert abs(loss.item() - want["loss"].item()) <= 1e-4 * abs(want["loss"].item()) + 2e-6, \
        f"{tag}: loss {loss.item()!r} != reference {want['loss'].item()!r}"
    assert_metrics(metrics, want["metrics"], what=tag)
    for name, g, r, t in zip(("hidden", "weight", "bias"), grads, want["grads"],
                             (bt.hidden, bt.weight, bt.bias)):
        if t is None:
            continue
        assert g is not None, f"{tag}: no gradient for {name}"
        assert g.dtype == t.dtype, f"{tag}: grad of {name} is {g.dtype}, input is {t.dtype}"
        assert_close(g, r, **tol, what=f"{tag}: d{name}")


# ------------------------------------------------------------------------------------------------
# Fused losses vs the reference
# ------------------------------------------------------------------------------------------------

# (layout, chunk_size): chunk 3 cuts every sequence of 7 (sub-chunks) and the packed ones of 7 and
# 12; chunk 5 holds [3, 0] then sub-chunks; chunk 16 holds two (B, T) rows or [3, 0, 7] packed;
# None is the default (one chunk for these shapes).
LAYOUT_CHUNKS = [("bt", None), ("bt", 3), ("cu", 5), ("cu", 16), ("ids", 3), ("ids", None)]


def backend_layouts(layout_chunks):
    """(backend, layout, chunk_size) params; the materializing reference backend has no chunks."""
    out = []
    for be in CPU_BACKENDS:
        name = be.values[0] if hasattr(be, "values") else be
        marks = be.marks if hasattr(be, "values") else ()
        for layout, chunk in layout_chunks:
            if name == "reference" and chunk is not None:
                continue
            out.append(pytest.param(name, layout, chunk, marks=marks, id=f"{name}-{layout}-{chunk}"))
    return out


@pytest.mark.parametrize("backend,layout,chunk_size", backend_layouts(LAYOUT_CHUNKS))
@pytest.mark.parametrize("case", list(CASES))
def test_fused_loss_fp32(case, backend, layout, chunk_size):
    check_against_reference(case, layout, torch.float32, backend, chunk_size)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(TEMPERATURE))
def test_fused_loss_temperature(case, backend):
    check_against_reference(case, "cu", torch.float32, backend, 5, temperature=TEMPERATURE[case])
    check_against_reference(case, "bt", torch.float32, backend, None, temperature=TEMPERATURE[case])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["default", "token", "exact", "gsm", "grpo", "gspo"])
def test_fused_loss_without_bias(case, backend):
    check_against_reference(case, "bt", torch.float32, backend, 3, bias=False)
    check_against_reference(case, "ids", torch.float32, backend, 16, bias=False)


@pytest.mark.parametrize("backend,layout,chunk_size", backend_layouts([("bt", None), ("cu", 3)]))
@pytest.mark.parametrize("case", list(CASES))
def test_fused_loss_bf16(case, backend, layout, chunk_size):
    check_against_reference(case, layout, torch.bfloat16, backend, chunk_size)


@pytest.mark.parametrize("backend,layout,chunk_size", backend_layouts([("bt", None), ("cu", 3)]))
@pytest.mark.parametrize("case", ["default", "token", "exact", "gsm", "grpo", "gspo_wide"])
def test_fused_loss_fp16(case, backend, layout, chunk_size):
    check_against_reference(case, layout, torch.float16, backend, chunk_size)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_loss_mask_none_and_float_mask(backend):
    """mask=None means 'valid wherever targets != ignore_index'; a 0/1 float mask acts like bool."""
    bt = ref.make_batch("bt", use_mask=False, junk_masked=False, seed=3)
    want = ref.reference_loss(bt, {})
    loss, metrics, grads = run_fused(bt, {}, backend=backend)
    assert abs(loss.item() - want["loss"].item()) <= 1e-4 * abs(want["loss"].item()) + 2e-6
    assert_metrics(metrics, want["metrics"])
    assert_close(grads[0], want["grads"][0], **FP32_TOL, what="dhidden")
    bt2 = ref.make_batch("bt", seed=4, junk_masked=False)
    want2 = ref.reference_loss(bt2, {"level": "token"})
    bt2.mask = bt2.mask.float()
    loss2, _, grads2 = run_fused(bt2, {"level": "token"}, backend=backend)
    assert abs(loss2.item() - want2["loss"].item()) <= 1e-4 * abs(want2["loss"].item()) + 2e-6
    assert_close(grads2[1], want2["grads"][1], **FP32_TOL, what="dweight")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_loss_custom_ignore_index(backend):
    bt = ref.make_batch("cu", ignore_index=7, seed=5)
    want = ref.reference_loss(bt, {"level": "token"}, ignore_index=7)
    h, w, b = _leaves(bt)
    loss, metrics = fused_opo_loss(h, w, bt.targets, bt.advantages, bt.old_logps, bt.mask, bias=b,
                                   ignore_index=7, level="token", backend=backend, **bt.layout_kw)
    loss.backward()
    assert abs(loss.item() - want["loss"].item()) <= 1e-4 * abs(want["loss"].item()) + 2e-6
    assert_metrics(metrics, want["metrics"])
    assert_close(h.grad, want["grads"][0], **FP32_TOL, what="dhidden")
    assert_close(w.grad, want["grads"][1], **FP32_TOL, what="dweight")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["default", "refcorr", "gsm", "grpo", "gspo", "token"])
def test_fused_loss_on_policy_reference(case, backend):
    """old_logps=None: the anchor is the current policy, detached (Δ = 0 but ω, ℓ still act)."""
    bt = _batch("cu", torch.float32, True, 1.0)
    want = ref.reference_loss(bt, CASES[case], old=None)
    h, w, b = _leaves(bt)
    loss, metrics = fused_policy_loss(h, w, bt.targets, bt.advantages, None, bt.mask, bias=b,
                                      backend=backend, chunk_size=ref.chunk_for(backend, 5), **bt.layout_kw, **CASES[case])
    loss.backward()
    assert abs(loss.item() - want["loss"].item()) <= 1e-4 * abs(want["loss"].item()) + 2e-6
    assert float(metrics["delta_abs_mean"]) == 0.0 and float(metrics["chi2"]) == 0.0
    assert_metrics(metrics, want["metrics"])
    for name, g, r in zip(("hidden", "weight", "bias"), (h.grad, w.grad, b.grad), want["grads"]):
        assert_close(g, r, **FP32_TOL, what=f"{case}: d{name}")


def test_fused_opo_loss_is_fused_policy_loss_opo():
    bt = _batch("bt", torch.float32, True, 1.0)
    a = fused_opo_loss(bt.hidden, bt.weight, bt.targets, bt.advantages, bt.old_logps, bt.mask,
                       bias=bt.bias, level="token", backend="torch")
    b = fused_policy_loss(bt.hidden, bt.weight, bt.targets, bt.advantages, bt.old_logps, bt.mask,
                          bias=bt.bias, level="token", backend="torch", loss="opo")
    assert torch.equal(a[0], b[0])


# ------------------------------------------------------------------------------------------------
# linear_logprobs
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout,chunk_size", [("bt", None), ("bt", 3), ("cu", 5), ("ids", 16)])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_logprobs(backend, layout, chunk_size, dtype):
    bt = ref.make_batch(layout, dtype, junk_masked=False, temperature=0.8, seed=7)
    h, w, b = _leaves(bt)
    logp, ent = linear_logprobs(h, w, bt.targets, bias=b, temperature=0.8, return_entropy=True,
                                backend=backend, chunk_size=ref.chunk_for(backend, chunk_size), **bt.layout_kw)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert logp.shape == bt.targets.shape and ent.shape == bt.targets.shape
    ign = bt.targets == -100
    assert bool((logp[ign] == 0).all()), "ignore_index positions must give log-prob 0"
    assert bool((ent[ign] == 0).all()), "ignore_index positions must give entropy 0"
    # Backward through both outputs with arbitrary weights: exercises the entropy gradient too.
    g = torch.Generator().manual_seed(1)
    c1 = torch.randn(bt.targets.shape, generator=g)
    c2 = torch.randn(bt.targets.shape, generator=g)
    ((logp * c1).sum() + (ent * c2).sum()).backward()

    h64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (bt.hidden, bt.weight, bt.bias))
    lp64, ent64 = ref.logprobs(h64, w64, bt.targets, b64, 0.8)
    ent64 = torch.where(ign, 0.0, ent64)
    ((lp64 * c1.double()).sum() + (ent64 * c2.double()).sum()).backward()
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    assert_close(logp, lp64, rtol=1e-5, atol_rel=1e-6, what="logp")
    assert_close(ent, ent64, rtol=1e-5, atol_rel=1e-6, what="entropy")
    for name, got, want, t in (("hidden", h.grad, h64.grad, h), ("weight", w.grad, w64.grad, w),
                               ("bias", b.grad, b64.grad, b)):
        assert got.dtype == t.dtype, f"d{name} dtype {got.dtype} != {t.dtype}"
        assert_close(got, want, **tol, what=f"d{name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_logprobs_logp_only_no_bias(backend):
    bt = ref.make_batch("bt", bias=False, junk_masked=False, seed=8)
    h, w, _ = _leaves(bt)
    logp = linear_logprobs(h, w, bt.targets, backend=backend, chunk_size=ref.chunk_for(backend, 4))
    assert isinstance(logp, torch.Tensor)
    logp.sum().backward()
    h64, w64 = (t.detach().double().requires_grad_(True) for t in (bt.hidden, bt.weight))
    lp64, _ = ref.logprobs(h64, w64, bt.targets)
    lp64.sum().backward()
    assert_close(logp, lp64, rtol=1e-5, atol_rel=1e-6, what="logp")
    assert_close(h.grad, h64.grad, **FP32_TOL, what="dhidden")
    assert_close(w.grad, w64.grad, **FP32_TOL, what="dweight")


# ------------------------------------------------------------------------------------------------
# policy_loss / opo_loss from per-token log-probs
# ------------------------------------------------------------------------------------------------

def _token_inputs(layout, seed=11):
    bt = ref.make_batch(layout, seed=seed)
    lp64, ent64 = ref.logprobs(bt.hidden.reshape(-1, bt.H), bt.weight, bt.targets.reshape(-1), bt.bias)
    shape = bt.targets.shape
    return bt, lp64.float().reshape(shape), ent64.float().reshape(shape)


@pytest.mark.parametrize("layout", ["bt", "cu", "ids"])
@pytest.mark.parametrize("case", list(CASES))
def test_policy_loss_from_logps(case, layout):
    bt, lp32, ent32 = _token_inputs(layout)
    valid = bt.valid.reshape(bt.targets.shape) > 0  # policy_loss has no targets: the mask says it all
    logps = lp32.clone().requires_grad_(True)
    opts = CASES[case]
    loss, metrics = policy_loss(logps, bt.old_logps, bt.advantages, valid, entropy=ent32,
                                vocab_size=bt.V, **bt.layout_kw, **opts)
    loss.backward()
    lp64 = lp32.double().reshape(-1).requires_grad_(True)
    ropts = dict(opts)
    if ropts.get("loss") == "dr_grpo" and ropts.get("max_completion_length") is None:
        ropts["max_completion_length"] = bt.max_len
    want, wm = ref.policy_loss(lp64, bt.old_logps.reshape(-1), bt.advantages, bt.valid, bt.lengths,
                               vocab_size=bt.V, entropy=ent32.reshape(-1), **ropts)
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item()) + 1e-6, \
        f"{case}/{layout}: loss {loss.item()} != {want.item()}"
    assert_metrics(metrics, wm, what=f"{case}/{layout}")
    assert_close(logps.grad.reshape(-1), lp64.grad, rtol=1e-5, atol_rel=1e-6, what="dlogps")


def test_opo_loss_is_policy_loss_opo_and_entropy_optional():
    bt, lp32, _ = _token_inputs("bt")
    valid = bt.valid.reshape(bt.targets.shape) > 0
    a, ma = opo_loss(lp32, bt.old_logps, bt.advantages, valid, level="token")
    b, _ = policy_loss(lp32, bt.old_logps, bt.advantages, valid, loss="opo", level="token")
    assert torch.equal(a, b)
    assert "entropy" not in ma  # no entropy given: no entropy metric invented


def test_policy_loss_mask_none_all_valid():
    g = torch.Generator().manual_seed(2)
    lp = -torch.rand(4, 5, generator=g) * 3
    old = lp + 0.1 * torch.randn(4, 5, generator=g)
    adv = torch.randn(4, generator=g)
    loss, m = opo_loss(lp, old, adv)
    want, wm = ref.policy_loss(lp.reshape(-1).double(), old.reshape(-1).double(), adv,
                               torch.ones(20), [5] * 4)
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item()) + 1e-6
    assert float(m["num_tokens"]) == 20 and float(m["num_seqs"]) == 4


# ------------------------------------------------------------------------------------------------
# escort_weights and group_advantages
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", ["zscore", "center"])
@pytest.mark.parametrize("scope", ["batch", "group"])
@pytest.mark.parametrize("with_anchor", [False, True])
def test_escort_weights(normalize, scope, with_anchor):
    g = torch.Generator().manual_seed(3)
    adv = torch.randn(8, generator=g) * 2
    anchor = -torch.rand(8, generator=g) * 4 if with_anchor else None
    valid = torch.tensor([1, 1, 0, 1, 1, 1, 1, 0], dtype=torch.bool)
    kw = dict(alpha=0.3, tau=0.7, normalize=normalize, norm_scope=scope,
              group_size=4 if scope == "group" else None)
    got = escort_weights(adv, anchor_seq_logps=anchor, valid=valid, **kw)
    want = ref.escort_weights(adv, anchor_seq_logps=anchor, valid=valid, **kw)
    assert got.shape == (8,) and got.dtype == torch.float32 and not got.requires_grad
    assert_close(got, want, rtol=1e-5, atol_rel=1e-6, what="omega")
    assert bool((got[~valid] == 0).all())
    if normalize == "center" and scope == "batch":
        assert abs(float(got[valid].mean())) < 1e-6  # E[ω] = 1 before subtracting 1


def test_escort_weights_defaults_and_grad_free():
    adv = torch.tensor([1.0, -0.5, 0.25, 2.0], requires_grad=True)
    got = escort_weights(adv)
    assert got.grad_fn is None
    assert_close(got, ref.escort_weights(adv), rtol=1e-5, atol_rel=1e-6, what="omega")


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages(scale):
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 2.0, 0.0])
    got = group_advantages(r, 4, scale=scale)
    want = ref.group_advantages(r, 4, scale=scale)
    assert got.shape == (12,)
    assert_close(got, want, rtol=1e-5, atol_rel=1e-6, what=f"advantages/{scale}")
    assert bool((got[4:8] == 0).all())  # a group of equal rewards has no signal


# ------------------------------------------------------------------------------------------------
# Triton backend (TRITON_INTERPRET=1 on CPU: tiny shapes)
# ------------------------------------------------------------------------------------------------

def _triton_import_error():
    try:
        importlib.import_module("opo_kernels.vocab_triton")
    except Exception as e:  # noqa: BLE001 - any import failure means "not ready"
        return f"opo_kernels.vocab_triton does not import: {type(e).__name__}: {e}"
    return None


_TRITON_ERR = _triton_import_error()
if _TRITON_ERR is None and os.environ.get("TRITON_INTERPRET") != "1":
    # These build their batches on the CPU; on a CUDA machine the kernels compile for the GPU and
    # are tested there by test_vocab_triton.py and test_fused_linear.py (the device fixture).
    _TRITON_ERR = "CPU-tensor interpreter tests; TRITON_INTERPRET is not set (a CUDA machine)"
triton_only = pytest.mark.skipif(_TRITON_ERR is not None, reason=_TRITON_ERR or "")

TRITON_CASES = [
    ("default", "bt", None, 1.0),
    ("token", "cu", 5, 1.0),
    ("exact", "ids", 3, 0.7),
    ("gsm", "bt", 16, 1.0),
    ("grpo", "cu", None, 1.3),
    ("gspo_wide", "ids", 5, 1.0),
    ("refcorr_sum_token_group", "bt", 3, 1.0),
    ("clamp_exact_token", "cu", 16, 1.0),
    ("dr_grpo", "bt", 5, 1.0),
    ("group2_center_token", "ids", None, 0.7),
]


@triton_only
@pytest.mark.parametrize("case,layout,chunk_size,temperature", TRITON_CASES)
def test_triton_backend(case, layout, chunk_size, temperature):
    check_against_reference(case, layout, torch.float32, "triton", chunk_size, temperature=temperature)


@triton_only
@pytest.mark.parametrize("case", ["default", "dapo"])
def test_triton_backend_bf16(case):
    check_against_reference(case, "cu", torch.bfloat16, "triton", 5)


@triton_only
def test_triton_backend_without_bias():
    check_against_reference("token", "bt", torch.float32, "triton", 3, bias=False)


def _fused_import_error():
    try:
        importlib.import_module("opo_kernels.fused_linear")
    except Exception as e:  # noqa: BLE001
        return f"opo_kernels.fused_linear does not import: {type(e).__name__}: {e}"
    return None


_FUSED_ERR = _fused_import_error() or _TRITON_ERR


@pytest.mark.skipif(_FUSED_ERR is not None, reason=_FUSED_ERR or "")
@pytest.mark.parametrize("case,layout,chunk_size,temperature,dtype", [
    ("default", "bt", None, 1.0, torch.float32),
    ("token", "cu", 5, 0.7, torch.float32),
    ("gsm", "bt", None, 1.0, torch.float32),
    ("gspo_wide", "ids", 3, 1.0, torch.bfloat16),
], ids=["default-bt", "token-cu-T0.7", "gsm-bt", "gspo_wide-ids-bf16"])
def test_fused_linear_backend(case, layout, chunk_size, temperature, dtype):
    """backend="fused" (GEMM and vocabulary pass in one Triton kernel) on the same contract."""
    check_against_reference(case, layout, dtype, "fused", chunk_size, temperature=temperature)


@triton_only
def test_triton_linear_logprobs_and_all_masked():
    bt = ref.make_batch("cu", junk_masked=False, temperature=0.7, seed=9)
    h, w, b = _leaves(bt)
    logp, ent = linear_logprobs(h, w, bt.targets, bias=b, temperature=0.7, return_entropy=True,
                                backend="triton", chunk_size=5, **bt.layout_kw)
    (logp.sum() + 0.5 * ent.sum()).backward()
    h64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (bt.hidden, bt.weight, bt.bias))
    lp64, ent64 = ref.logprobs(h64, w64, bt.targets, b64, 0.7)
    ent64 = torch.where(bt.targets == -100, 0.0, ent64)  # ignored positions: entropy 0 too
    (lp64.sum() + 0.5 * ent64.sum()).backward()
    assert_close(logp, lp64, rtol=1e-5, atol_rel=1e-6, what="logp")
    assert_close(ent, ent64, rtol=1e-5, atol_rel=1e-6, what="entropy")
    assert_close(h.grad, h64.grad, **FP32_TOL, what="dhidden")
    assert_close(w.grad, w64.grad, **FP32_TOL, what="dweight")
    assert_close(b.grad, b64.grad, **FP32_TOL, what="dbias")
    # All-masked batch through the Triton pass: loss 0, zero gradients, nothing NaN.
    h, w, b = _leaves(bt)
    loss, metrics = fused_opo_loss(h, w, bt.targets, bt.advantages, bt.old_logps,
                                   torch.zeros_like(bt.targets, dtype=torch.bool), bias=b,
                                   backend="triton", chunk_size=5, **bt.layout_kw)
    loss.backward()
    assert loss.item() == 0.0
    for t in (h.grad, w.grad, b.grad):
        assert t is not None and bool((t == 0).all())
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.skipif(_FUSED_ERR is not None, reason=_FUSED_ERR or "")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_backend_without_fp32_gradient_buffers(dtype):
    """accum_fp32=False (no V x H fp32 buffer) gives the reference backend's loss and gradients:
    fp32 to fp32 accuracy, bf16 at its rounding."""
    g = torch.Generator().manual_seed(5)
    B, T, H, V = 3, 7, 24, 150
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    old = -torch.rand(B, T, generator=g) * 5
    out = {}
    for name, kw in (("reference", {"backend": "reference"}),
                     ("fused", {"backend": "fused", "accum_fp32": False, "filter_eps": 0.0})):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        loss, _ = fused_opo_loss(h, w, targets, adv, old, **kw)
        loss.backward()
        assert h.grad.dtype == dtype and w.grad.dtype == dtype
        out[name] = (loss, h.grad, w.grad)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for a, b in zip(out["fused"], out["reference"]):
        torch.testing.assert_close(a.float(), b.float(), **tol)


def test_accum_fp32_is_a_fused_option():
    h, w = torch.randn(2, 3, 8), torch.randn(20, 8)
    t = torch.randint(0, 20, (2, 3))
    with pytest.raises(ValueError, match="accum_fp32"):
        fused_opo_loss(h, w, t, torch.randn(2), backend="torch", accum_fp32=False)
    with pytest.raises((TypeError, ValueError), match="accum_fp32"):
        fused_opo_loss(h, w, t, torch.randn(2), backend="torch", accum_fp32="no")
