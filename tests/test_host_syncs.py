"""Host synchronizations per call: the value rules of a call are read back together, once.

On CPU a counter sees every operation that would make the host wait for a GPU: a read-back
(``tolist``, ``item`` / ``bool`` / ``int`` of a tensor) and the operations whose output size
depends on the data (``nonzero``, boolean indexing, ``masked_select``, ``unique``, ``bincount``,
``repeat_interleave`` without ``output_size``). On CUDA, ``torch.cuda.set_sync_debug_mode``
checks the same calls on the device.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from opo_kernels import fused_opo_loss, fused_policy_loss, linear_logprobs, policy_loss

_DATA_DEPENDENT = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique",
                   "_unique", "_unique2", "unique_dim", "unique_consecutive", "bincount",
                   "is_nonzero", "equal", "item"}


class _Syncs(TorchDispatchMode):
    """Counts the host synchronizations of the code run under it (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        sync = name in _DATA_DEPENDENT
        if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
                    torch.ops.aten.index_put_.default):
            sync = any(i is not None and i.dtype == torch.bool for i in args[1])
        if name == "repeat_interleave" and kwargs.get("output_size") is None and \
                isinstance(args[0], torch.Tensor) and len(args) < 2:
            sync = True
        if sync:
            self.seen.append(name)
        return func(*args, **kwargs)


@pytest.fixture
def syncs(monkeypatch):
    """A counter; ``tolist``/``numpy`` (which do not dispatch on CPU) are counted by patching."""
    mode = _Syncs()
    for meth in ("tolist", "numpy"):
        orig = getattr(torch.Tensor, meth)

        def counted(self, *a, _orig=orig, _name=meth, **k):
            mode.seen.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, meth, counted)
    return mode


def test_the_counter_sees_each_kind_of_synchronization(syncs):
    t = torch.tensor([0.0, 1.0, 2.0])
    with syncs:
        t.tolist()
        bool(t.any())
        _ = t[t > 0]
        torch.nonzero(t)
        float(t.sum())
    assert syncs.seen == ["tolist", "_local_scalar_dense", "index", "nonzero", "_local_scalar_dense"]


B, T, H, V = 4, 5, 8, 13


def _batch():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 4] = -100  # an ignored position
    old = -torch.rand(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).float()  # 0/1 numbers: a rule on the values
    mask[:, 0] = 1
    return hidden, weight, targets, torch.randn(B, generator=g), old, mask


RL = dict(ref_logps="REF", beta=0.1, rollout_logps="ROLL", is_correction="sequence_truncate")
CASES = [
    dict(),
    dict(RL, omega="OMEGA", num_seqs_in_batch=torch.tensor(6.0)),
    dict(RL, loss="grpo", clip_ratio_c=3.0, num_seqs_in_batch=7),
    dict(RL, loss="dapo", entropy_coef=0.01, num_items_in_batch=torch.tensor(40)),
    dict(loss="dr_grpo", max_completion_length=T),
    dict(loss="gspo", rollout_logps="ROLL", is_correction="token_mask"),
    dict(loss="cispo"),
]


def _resolve(kw, old):
    subst = {"REF": old - 0.1, "ROLL": old - 0.05, "OMEGA": torch.rand(B) + 0.5}
    return {k: subst[v] if isinstance(v, str) and v in subst else v for k, v in kw.items()}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kw", CASES, ids=[",".join(c) or "opo" for c in CASES])
def test_fused_policy_loss_reads_back_once(syncs, backend, kw):
    hidden, weight, targets, adv, old, mask = _batch()
    kw = _resolve(kw, old)
    with syncs:
        loss, metrics = fused_policy_loss(hidden, weight, targets, adv, old, mask, backend=backend, **kw)
    assert syncs.seen == ["tolist"], syncs.seen
    assert torch.isfinite(loss)


def test_fused_opo_loss_and_linear_logprobs_read_back_once(syncs):
    hidden, weight, targets, adv, old, mask = _batch()
    with syncs:
        fused_opo_loss(hidden, weight, targets, adv, old, mask, backend="torch")
    assert syncs.seen == ["tolist"], syncs.seen
    syncs.seen.clear()
    with syncs, torch.no_grad():
        linear_logprobs(hidden, weight, targets, backend="torch")
    assert syncs.seen == ["tolist"], syncs.seen


def test_policy_loss_reads_back_once(syncs):
    hidden, weight, targets, adv, old, mask = _batch()
    logps = (old - 0.1).requires_grad_(True)
    ent = torch.rand(B, T)
    with syncs:
        policy_loss(logps, old, adv, mask, entropy=ent, entropy_coef=0.01, loss="dapo",
                    **_resolve(RL, old))
    assert syncs.seen == ["tolist"], syncs.seen


@pytest.mark.parametrize("packing", ["cu_seqlens", "seq_ids"])
def test_packed_batch_adds_only_the_read_of_its_lengths(syncs, packing):
    # The host needs the sequence lengths to plan the logits chunks: one read for them (with
    # seq_ids, together with its rules), one for the value rules.
    hidden, weight, targets, adv, old, mask = _batch()
    lengths = torch.tensor([3, 7, 0, 10])
    pack = dict(cu_seqlens=torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])) \
        if packing == "cu_seqlens" else dict(seq_ids=torch.repeat_interleave(torch.arange(B), lengths))
    h, t, o, m = (x.reshape(B * T, *x.shape[2:]) for x in (hidden.detach(), targets, old, mask))
    with syncs:
        fused_policy_loss(h, weight, t, adv, o, m, backend="torch", **pack)
    assert syncs.seen == ["tolist", "tolist"], syncs.seen


def test_a_broken_rule_still_raises_its_own_message(syncs):
    # the batched read-back keeps each rule's error: the first broken rule, with example values
    hidden, weight, targets, adv, old, mask = _batch()
    bad = old.clone()
    bad[1, 2] = 0.5
    with pytest.raises(ValueError, match=r"old_logps must be log-probs .*\[0\.5\]"):
        fused_policy_loss(hidden, weight, targets, adv, bad, mask, backend="torch")
    bad_mask = mask.clone()
    bad_mask[2, 3] = 0.25
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1 .*\[0\.25\]"):
        fused_policy_loss(hidden, weight, targets, adv, bad, bad_mask, backend="torch")
    with pytest.raises(ValueError, match="num_items_in_batch must be finite and >= 0, got -3.0"):
        fused_policy_loss(hidden, weight, targets, adv, old, mask, backend="torch", loss="dapo",
                          num_items_in_batch=torch.tensor(-3.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (set_sync_debug_mode)")
def test_cuda_sync_debug_mode():
    hidden, weight, targets, adv, old, mask = (x.cuda() if isinstance(x, torch.Tensor) else x
                                               for x in _batch())
    hidden = hidden.detach().requires_grad_(True)
    fused_policy_loss(hidden, weight, targets, adv, old, mask)  # warm-up: kernels compiled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning, match="synchroniz") as rec:
            fused_policy_loss(hidden, weight, targets, adv, old, mask, **_resolve(RL, old))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len([w for w in rec if "synchroniz" in str(w.message)]) <= 1


def test_escort_weights_reads_back_once(syncs):
    from opo_kernels import escort_weights
    valid = torch.tensor([True, True, False, True, True, True])
    with syncs:
        escort_weights(torch.randn(6), valid=valid, anchor_seq_logps=-torch.rand(6))
    assert syncs.seen == ["tolist"], syncs.seen
