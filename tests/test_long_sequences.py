"""Sequences much longer than the logits chunk (many sub-chunks each) against the float64
reference: sequence-level losses (paper-mode OPO, GSPO, group_softmax), the per-token ones, packed
batches, masks and RL terms, on the torch / native / Triton-interpreter backends; and how many
times each path computes a token's logits (docs/contract.md, "GEMMs per call").
"""
from __future__ import annotations

import os

import pytest
import torch

import reference as ref
from reference import single_thread  # noqa: F401  (autouse fixture)
from opo_kernels import chunked, fused_policy_loss
from test_rl_terms import close, rl_tensors

# Packed: a long sequence first (dw fresh), an empty one, then long ones after others (dw holds
# earlier products), a short one that fits a chunk.
LENGTHS = [23, 0, 3, 31, 2, 17]
CHUNK = 4

SEQ_SCALED = {
    "opo": dict(loss="opo"),
    "opo_sum_exact": dict(loss="opo", seq_reduce="sum", ratio="exact"),
    "opo_clamp": dict(loss="opo", max_log_ratio=0.05),
    "opo_group": dict(loss="opo", norm_scope="group", group_size=2),
    "gspo": dict(loss="gspo"),
    "gspo_dual": dict(loss="gspo", clip_eps_low=0.05, clip_eps_high=0.08, clip_ratio_c=1.5),
    "opo_is_tok": dict(loss="opo", is_correction="token_truncate", is_clip_max=1.2),
    "gspo_is_tok_mask": dict(loss="gspo", is_correction="token_mask", is_clip_max=1.3,
                             is_clip_min=0.8),
    "opo_is_seq": dict(loss="opo", is_correction="sequence_mask", is_clip_max=2.0,
                       is_clip_min=0.5),
    "gspo_is_seq": dict(loss="gspo", is_correction="sequence_truncate", is_clip_max=1.5,
                        is_clip_min=0.5),
}
PER_TOKEN = {
    "grpo": dict(loss="grpo"),
    "grpo_kl_entropy": dict(loss="grpo", beta=0.1, entropy_coef=0.05),
    "dapo_is_tok": dict(loss="dapo", is_correction="token_mask", is_clip_max=1.3, is_clip_min=0.8),
    "opo_token_kl": dict(loss="opo", level="token", beta=0.1),
}
FOUR_GEMMS = {
    "opo_kl": dict(loss="opo", beta=0.1),
    "gspo_kl_bias": dict(loss="gspo", beta=0.2, use_bias_correction_kl=True),
    "opo_entropy": dict(loss="opo", entropy_coef=0.05),
    "grpo_is_seq": dict(loss="grpo", is_correction="sequence_truncate", is_clip_max=1.5,
                        is_clip_min=0.5),
}
TWO_PHASE = {
    "gsm": dict(loss="opo", escort="group_softmax", group_size=2),
    "refcorr_onpolicy": dict(loss="opo", ref_correction=True),
}
ALL = {**SEQ_SCALED, **PER_TOKEN, **FOUR_GEMMS, **TWO_PHASE}


def _batch(dtype=torch.float32, bias=True, layout="cu"):
    if layout == "bt":
        return ref.make_batch("bt", dtype, B=4, T=19, bias=bias, seed=3)
    return ref.make_batch(layout, dtype, lengths=LENGTHS, bias=bias, seed=3)


def run(bt, backend, opts, chunk=CHUNK, on_policy=False, reference=True):
    """(loss, metrics, grads) of the API and (``reference``) the float64 reference for ``opts``."""
    refl, roll = rl_tensors(bt)
    kw = dict(opts)
    kw["ref_logps"], kw["rollout_logps"] = refl, roll
    if kw.get("is_correction") is None and kw.get("beta", 0) == 0:
        kw.pop("rollout_logps")
    h = bt.hidden.clone().requires_grad_(True)
    w = bt.weight.clone().requires_grad_(True)
    b = None if bt.bias is None else bt.bias.clone().requires_grad_(True)
    old = None if on_policy else bt.old_logps
    loss, m = fused_policy_loss(h, w, bt.targets, bt.advantages, old, bt.mask, bias=b,
                                backend=backend, chunk_size=chunk, **bt.layout_kw, **kw)
    loss.backward()
    want = ref.reference_loss(bt, kw, old=None if on_policy else "batch") if reference else None
    return loss, m, (h.grad, w.grad, None if b is None else b.grad), want


def check(bt, backend, opts, tol, on_policy=False, chunk=CHUNK):
    on_policy = on_policy or opts is TWO_PHASE["refcorr_onpolicy"]
    loss, m, grads, want = run(bt, backend, opts, chunk, on_policy)
    terms = max(float(want["grads"][1].abs().max()), 1e-12)  # a loss near 0 cancels terms
    # the loss is a mean of per-sequence terms of order 1 (|ω|, |Δ|, ratios ≲ 1): that is the
    # scale its rounding is relative to, however much they cancel
    close(loss, want["loss"], "loss", rtol=tol, atol_rel=tol, floor=1.0)
    for k, v in want["metrics"].items():
        if k == "tau_eff":  # the reference's own diagnostic
            continue
        assert abs(float(m[k]) - v) <= 1e-4 * abs(v) + 1e-6, f"metric {k}: {float(m[k])} != {v}"
    for name, g, r in zip(("hidden", "weight", "bias"), grads, want["grads"]):
        if r is None:
            continue
        assert g.dtype == (bt.hidden.dtype if name == "hidden" else bt.weight.dtype)
        close(g, r, f"d{name}", rtol=tol, atol_rel=tol, floor=terms if name == "weight" else 0)


# fp32: the chunked sums differ from the float64 reference by fp32 rounding of sums over a few
# dozen tokens and H = 32 products (≲ 1e-6 relative); 1e-5 as in test_rl_terms. bf16: the inputs
# are rounded to bf16 (8 bits), and the gradients are returned in bf16: 2e-2 as test_losses.
FP32, BF16 = 1e-5, 2e-2


@pytest.mark.parametrize("backend", ref.backends("torch", "native"))
@pytest.mark.parametrize("case", list(ALL))
def test_long_sequences_packed(case, backend):
    check(_batch(), backend, ALL[case], FP32)


@pytest.mark.parametrize("backend", ref.backends("torch", "native"))
@pytest.mark.parametrize("case", ["opo", "gspo", "grpo", "opo_is_tok", "opo_kl", "gsm"])
def test_long_sequences_bt_and_ids(case, backend):
    check(_batch(layout="bt"), backend, ALL[case], FP32, chunk=5)
    check(_batch(layout="ids", bias=False), backend, ALL[case], FP32, chunk=3)


@pytest.mark.parametrize("backend", ref.backends("torch", "native"))
@pytest.mark.parametrize("case", ["opo", "gspo_is_tok_mask", "opo_is_tok", "grpo"])
def test_long_sequences_on_policy(case, backend):
    """No anchor: Δ = 0 exactly, the importance weights' anchor is the current log-prob."""
    check(_batch(), backend, ALL[case], FP32, on_policy=True)


@pytest.mark.parametrize("backend", ref.backends("torch", "native"))
@pytest.mark.parametrize("case", ["opo", "gspo", "grpo", "opo_kl"])
def test_long_sequences_bf16(case, backend):
    check(_batch(torch.bfloat16), backend, ALL[case], BF16)


_INTERP = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not _INTERP, reason="CPU-tensor interpreter test (TRITON_INTERPRET unset)")
@pytest.mark.parametrize("case", ["opo", "gspo_is_tok_mask", "grpo_kl_entropy", "opo_kl"])
def test_long_sequences_triton(case):
    pytest.importorskip("triton")
    check(_batch(), "triton", ALL[case], FP32)


def _logit_rows(monkeypatch, bt, opts, backend="torch", on_policy=False):
    """Rows of logits computed by one forward + backward (each row once per GEMM of z)."""
    rows = [0]
    orig = chunked.Head.logits

    def counting(self, a, b):
        rows[0] += b - a
        return orig(self, a, b)

    monkeypatch.setattr(chunked.Head, "logits", counting)
    run(bt, backend, opts, on_policy=on_policy)
    return rows[0]


@pytest.mark.parametrize("case", list(SEQ_SCALED) + list(PER_TOKEN))
def test_long_sequences_take_three_gemms(case, monkeypatch):
    """Sequence-scaled and per-token losses compute each token's logits once (three GEMMs)."""
    bt = _batch()
    assert _logit_rows(monkeypatch, bt, ALL[case]) == sum(LENGTHS)


@pytest.mark.parametrize("case", list(FOUR_GEMMS))
def test_other_long_sequences_take_four_gemms(case, monkeypatch):
    """A KL or entropy term on a sequence loss (their token part has no common scale) and
    sequence importance weights on a per-token loss: the logits of sequences longer than the
    chunk twice, of the others once."""
    long = sum(n for n in LENGTHS if n > CHUNK)
    assert _logit_rows(monkeypatch, _batch(), ALL[case]) == sum(LENGTHS) + long


@pytest.mark.parametrize("case", list(TWO_PHASE))
def test_two_phase_losses_take_four_gemms(case, monkeypatch):
    """group_softmax and an on-policy ref_correction need every log-prob first: logits twice."""
    rows = _logit_rows(monkeypatch, _batch(), ALL[case], on_policy=case == "refcorr_onpolicy")
    assert rows == 2 * sum(LENGTHS)


def test_long_sequence_deferred_buffer_only_when_needed(monkeypatch):
    """The open sequence's weight-gradient buffer exists only once dw already holds products:
    one long sequence alone adds straight into dw."""
    made = []
    orig = chunked._Grads.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(chunked._Grads, "__init__", spy)
    one = ref.make_batch("cu", torch.float32, lengths=[29], seed=4)
    check(one, "torch", ALL["opo"], FP32)
    assert made and made[-1].dw_open is None
    check(_batch(), "torch", ALL["opo"], FP32)
    assert made[-1].dw_open is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (host synchronizations)")
@pytest.mark.parametrize("case", ["opo", "gspo_is_tok_mask", "grpo_kl_entropy", "opo_kl"])
def test_chunk_loop_never_synchronizes_with_the_host(case):
    """The one-pass chunk loop (GEMMs, vocabulary passes, loss pieces, deferred scales) issues
    no host synchronization: it runs under torch.cuda.set_sync_debug_mode("error")."""
    from opo_kernels.chunked import LossArgs
    from opo_kernels.dispatch import Needs, get_backend
    from opo_kernels.losses import RLInputs, make_plan
    from opo_kernels.options import BackendOptions, LossOptions
    dev = torch.device("cuda")
    lengths = [700, 0, 300, 1100]
    N, H, V = sum(lengths), 64, 1000
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).to(dev)
    w = (0.3 * torch.randn(V, H, generator=g)).to(dev)
    tg = torch.randint(0, V, (N,), generator=g).to(dev)
    mask = (torch.rand(N, generator=g) > 0.2).float().to(dev)
    old = (-3.0 + 0.2 * torch.randn(N, generator=g)).to(dev) * mask
    adv = torch.randn(len(lengths), generator=g).to(dev)
    opts = dict(ALL[case])
    o = LossOptions(**opts)
    ex = RLInputs(ref=(old + 0.1) * mask if o.beta > 0 else None,
                rollout=(old - 0.1) * mask if o.is_correction else None)
    lens = torch.tensor(lengths, device=dev)
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=dev), lens)
    be = get_backend(dev, BackendOptions(backend="triton", chunk_size=256), V=V, lengths=lengths)
    la = LossArgs(plan=make_plan(o, adv, mask, lens, old, V, None, ex), targets=tg, mask=mask,
                  seq=seq, old=old)
    be.one_pass_loss(h, w, None, la, Needs(True, True, False))  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, *_ = be.one_pass_loss(h, w, None, la, Needs(True, True, False))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


# Options the float64 reference does not model (held against TRL in test_integration_trl.py at
# whole-sequence chunks): the long-sequence paths must give what whole-sequence chunks give.
TRL_OPTIONS = {
    "grpo_off_policy_mask": dict(loss="grpo", off_policy_mask_threshold=0.02),
    "grpo_seq_ratio": dict(loss="grpo", ratio_level="sequence"),
    "dapo_delta": dict(loss="dapo", clip_delta=1.1),
    "luspo": dict(loss="luspo"),
    "vespo": dict(loss="vespo"),
}


@pytest.mark.parametrize("backend", ref.backends("torch", "native"))
@pytest.mark.parametrize("case", list(TRL_OPTIONS))
def test_long_sequences_equal_whole_sequence_chunks(backend, case):
    bt = _batch()
    (l1, m1, g1, _), (l2, m2, g2, _) = (run(bt, backend, TRL_OPTIONS[case], chunk=c,
                                            reference=False) for c in (CHUNK, 512))
    close(l1, l2, "loss", rtol=FP32, atol_rel=FP32, floor=1.0)
    for k in m2:
        assert abs(float(m1[k]) - float(m2[k])) <= 1e-4 * abs(float(m2[k])) + 1e-6, k
    for name, a, b in zip(("hidden", "weight", "bias"), g1, g2):
        close(a, b, f"d{name}", rtol=FP32, atol_rel=FP32)
