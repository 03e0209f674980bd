"""Bad input (docs/contract.md, "Bad input"): a ValueError/TypeError whose message names the argument and what was seen.

Each test breaks one argument of an otherwise valid call. The "meta" device stands in for a
second device (no CUDA here). Values that are bad only at valid positions (targets out of range,
non-finite advantages / anchor log-probs) must be accepted where they are masked.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import reference as ref
from reference import single_thread  # noqa: F401  (autouse fixture)
from opo_kernels import (FusedOPOLoss, FusedPolicyLoss, escort_weights, fused_opo_loss, fused_policy_loss,
                         group_advantages, linear_logprobs, opo_loss, policy_loss)

B, T, H, V = 4, 5, 8, 37


def base(seed=0, dtype=torch.float32):
    """A valid (B, T) call: dict of the positional tensors and keyword options."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden=torch.randn(B, T, H, generator=g).to(dtype),
        weight=(torch.randn(V, H, generator=g) * 0.3).to(dtype),
        targets=torch.randint(0, V, (B, T), generator=g),
        advantages=torch.randn(B, generator=g),
        old_logps=-torch.rand(B, T, generator=g) * 3 - 1,
        mask=torch.rand(B, T, generator=g) > 0.2,
    )


def call(args, fn=fused_policy_loss, **kw):
    a = dict(args)
    return fn(a.pop("hidden"), a.pop("weight"), a.pop("targets"), a.pop("advantages"),
              a.pop("old_logps"), a.pop("mask"), **a, **kw)


def raises(fn, name, *seen):
    """fn() raises ValueError/TypeError whose message contains ``name`` and every ``seen``."""
    with pytest.raises((ValueError, TypeError)) as e:
        fn()
    msg = str(e.value)
    assert name in msg, f"error does not name {name!r}: {msg!r}"
    for s in seen:
        assert s in msg, f"error does not show {s!r}: {msg!r}"
    return msg


def with_(**changes):
    a = base()
    a.update(changes)
    return a


# ------------------------------------------------------------------------------------------------
# Shapes and types of the tensors
# ------------------------------------------------------------------------------------------------

def test_base_call_is_valid():
    loss, metrics = call(base())
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name,bad,seen", [
    ("hidden", torch.randn(B, T), ()),
    ("hidden", torch.randn(1, B, T, H), ("(1, 4, 5, 8)",)),
    ("hidden", torch.randint(0, 3, (B, T, H)), ("int64",)),
    ("hidden", [[0.0] * H] * T, ("list",)),
    ("weight", torch.randn(V, H + 1), ("(37, 9)",)),
    ("weight", torch.randn(V * H), ()),
    ("weight", torch.randn(V, H).bfloat16(), ("bfloat16",)),
    ("weight", torch.randn(V, H).double(), ("float64",)),
    ("targets", torch.randint(0, V, (B, T), dtype=torch.int32), ("int32",)),
    ("targets", torch.randint(0, V, (B, T)).float(), ("float32",)),
    ("targets", torch.randint(0, V, (B, T + 1)), ("(4, 6)",)),
    ("targets", torch.randint(0, V, (B * T,)), ("(20,)",)),
    ("advantages", torch.randn(B + 1), ("5",)),
    ("advantages", torch.randn(B, 1), ("(4, 1)",)),
    ("advantages", torch.ones(B, dtype=torch.int64), ("int64",)),
    ("old_logps", -torch.rand(B, T + 1), ("(4, 6)",)),
    ("old_logps", torch.zeros(B, T, dtype=torch.int64), ("int64",)),
    ("mask", torch.ones(B, T + 1, dtype=torch.bool), ("(4, 6)",)),
    ("mask", torch.full((B, T), 0.5), ()),
    ("mask", torch.full((B, T), 2, dtype=torch.int64), ()),
])
def test_bad_tensor(name, bad, seen):
    raises(lambda: call(with_(**{name: bad})), name, *seen)


def test_bad_bias():
    raises(lambda: call(base(), bias=torch.randn(V + 1)), "bias", "(38,)")
    raises(lambda: call(base(), bias=torch.randn(V).double()), "bias", "float64")
    raises(lambda: call(base(), bias=[0.0] * V), "bias")


def test_bf16_hidden_with_fp32_weight_is_rejected_not_cast():
    a = base()
    a["hidden"] = a["hidden"].bfloat16()
    raises(lambda: call(a), "weight", "bfloat16", "float32")


def test_mask_accepts_bool_and_0_1_numbers():
    a = base()
    want = call(a)[0]
    for m in (a["mask"].float(), a["mask"].to(torch.int64), a["mask"].to(torch.uint8)):
        assert torch.equal(call(with_(mask=m))[0], want)


# ------------------------------------------------------------------------------------------------
# Devices ("meta" plays the second device)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["weight", "targets", "advantages", "old_logps", "mask", "hidden"])
def test_tensors_on_different_devices(name):
    a = base()
    a[name] = a[name].to("meta")
    msg = raises(lambda: call(a), name, "meta")
    assert "cpu" in msg, msg


def test_bias_on_other_device():
    raises(lambda: call(base(), bias=torch.randn(V, device="meta")), "bias", "meta")


def test_linear_logprobs_devices():
    a = base()
    raises(lambda: linear_logprobs(a["hidden"], a["weight"].to("meta"), a["targets"]), "weight", "meta")
    raises(lambda: linear_logprobs(a["hidden"], a["weight"], a["targets"].to("meta")), "targets", "meta")


# ------------------------------------------------------------------------------------------------
# Values at valid positions
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_target", [V, V + 100, -1, -5])
def test_target_out_of_range_at_valid_position(bad_target):
    a = base()
    a["mask"][1, 2] = True
    a["targets"][1, 2] = bad_target
    raises(lambda: call(a), "targets", str(bad_target))
    raises(lambda: linear_logprobs(a["hidden"], a["weight"], a["targets"]), "targets", str(bad_target))


@pytest.mark.parametrize("bad_target", [V, -1])
def test_target_out_of_range_masked_or_ignored_is_fine(bad_target):
    a = base()
    want_mask = a["mask"].clone()
    want_mask[1, 2] = False
    a["mask"] = want_mask
    a["targets"][1, 2] = bad_target
    loss, m = call(a)
    assert torch.isfinite(loss)
    # The same position as ignore_index instead of masked.
    b = base()
    b["targets"][1, 2] = -100
    assert torch.isfinite(call(b)[0])
    # A custom ignore_index equal to the out-of-range value marks it ignored.
    c = base()
    c["mask"][1, 2] = True
    c["targets"][1, 2] = bad_target
    assert torch.isfinite(call(c, ignore_index=bad_target)[0])
    lp = linear_logprobs(c["hidden"], c["weight"], c["targets"], ignore_index=bad_target)
    assert lp[1, 2].item() == 0.0


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_advantage_of_a_valid_sequence(value):
    a = base()
    a["mask"][2, 0] = True
    a["advantages"][2] = value
    raises(lambda: call(a), "advantages")
    raises(lambda: call(a, loss="grpo"), "advantages")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_old_logps_at_a_valid_position(value):
    a = base()
    a["mask"][0, 3] = True
    a["old_logps"][0, 3] = value
    raises(lambda: call(a), "old_logps")
    raises(lambda: call(a, loss="dapo"), "old_logps")


def _reference_value(a, options):
    bt = ref.Batch()
    bt.hidden, bt.weight, bt.bias = a["hidden"], a["weight"], None
    bt.targets, bt.advantages, bt.old_logps = a["targets"], a["advantages"], a["old_logps"]
    bt.lengths, bt.V, bt.H, bt.max_len = [T] * B, V, H, T
    bt.valid = (a["mask"] & (a["targets"] != -100)).reshape(-1).double()
    return ref.reference_loss(bt, options, grads=False)["loss"].item()


MASKED_NONFINITE_OPTIONS = [{}, {"level": "token"}, {"ref_correction": True}, {"loss": "grpo"},
                           {"loss": "gspo"}]
MASKED_IDS = ["opo", "token", "ref_correction", "grpo", "gspo"]


def _check_ignored(a, options):
    a["hidden"] = a["hidden"].clone().requires_grad_(True)
    loss, metrics = call(a, **options)
    want = _reference_value(a, options)
    assert math.isfinite(loss.item()), f"loss is {loss.item()} with NaN/inf only at masked positions"
    assert abs(loss.item() - want) <= 1e-4 * abs(want) + 1e-6, (loss.item(), want)
    for k, v in metrics.items():
        assert torch.isfinite(v), f"metric {k} is {v}"
    loss.backward()
    assert torch.isfinite(a["hidden"].grad).all(), "non-finite hidden gradient"


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("options", MASKED_NONFINITE_OPTIONS, ids=MASKED_IDS)
def test_nonfinite_old_logps_at_masked_positions_are_ignored(options, value):
    """NaN/inf anchor log-probs where the mask is 0 must neither raise nor leak."""
    a = base()
    a["mask"][0, 1] = False
    a["old_logps"][0, 1] = value
    _check_ignored(a, options)


@pytest.mark.parametrize("options", MASKED_NONFINITE_OPTIONS, ids=MASKED_IDS)
def test_nonfinite_advantage_of_sequence_without_valid_tokens_is_ignored(options):
    """A sequence with L = 0 "takes no part in anything" (contract: Notation): its NaN advantage neither."""
    a = base()
    a["mask"][3] = False
    a["advantages"][3] = math.nan
    _check_ignored(a, options)


# ------------------------------------------------------------------------------------------------
# Scalars and option strings
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,value", [
    ("alpha", -0.1), ("alpha", 1.5), ("mu", 0.0), ("mu", -1.0), ("tau", 0.0), ("tau", -2.0),
    ("temperature", 0.0), ("temperature", -1.0), ("max_log_ratio", 0.0), ("max_log_ratio", -0.5),
    ("clip_eps_low", -0.1), ("clip_eps_high", -0.1),
])
def test_bad_scalar(name, value):
    loss = "grpo" if name.startswith("clip") else "opo"
    raises(lambda: call(base(), loss=loss, **{name: value}), name, repr(value))


@pytest.mark.parametrize("name", ["alpha", "mu", "tau", "temperature"])
def test_non_numeric_scalar(name):
    raises(lambda: call(base(), **{name: "1.0"}), name)


def test_nan_scalars_are_rejected():
    for name in ("alpha", "mu", "tau", "temperature"):
        raises(lambda: call(base(), **{name: math.nan}), name)


def test_linear_logprobs_bad_temperature():
    a = base()
    raises(lambda: linear_logprobs(a["hidden"], a["weight"], a["targets"], temperature=0.0),
           "temperature", "0.0")
    raises(lambda: linear_logprobs(a["hidden"], a["weight"], a["targets"], chunk_size=0),
           "chunk_size", "0")
    raises(lambda: linear_logprobs(a["hidden"], a["weight"], a["targets"], ignore_index=1.5),
           "ignore_index", "1.5")


@pytest.mark.parametrize("name,value", [
    ("level", "seq"), ("ratio", "linear"), ("normalize", "std"), ("norm_scope", "global"),
    ("seq_reduce", "max"), ("escort", "softmax"), ("loss", "ppo"), ("backend", "cuda"),
])
def test_unknown_option_string(name, value):
    raises(lambda: call(base(), **{name: value}), name, repr(value))


def test_unknown_backend_linear_logprobs():
    a = base()
    raises(lambda: linear_logprobs(a["hidden"], a["weight"], a["targets"], backend="gpu"),
           "backend", "'gpu'")


@pytest.mark.parametrize("group_size", [None, 3, 0, 5])
def test_group_scope_needs_dividing_group_size(group_size):
    raises(lambda: call(base(), norm_scope="group", group_size=group_size), "group_size",
           repr(group_size))


@pytest.mark.parametrize("group_size", [None, 3])
def test_group_softmax_needs_dividing_group_size(group_size):
    raises(lambda: call(base(), escort="group_softmax", group_size=group_size), "group_size")


def test_fused_opo_loss_refuses_loss_option():
    with pytest.raises(TypeError, match="loss"):
        call(base(), fn=fused_opo_loss, loss="grpo")
    with pytest.raises(TypeError, match="loss"):
        FusedOPOLoss(loss="grpo")


# ------------------------------------------------------------------------------------------------
# Packed layouts: cu_seqlens / seq_ids
# ------------------------------------------------------------------------------------------------

def packed(seed=0, lengths=(3, 0, 6, 2)):
    g = torch.Generator().manual_seed(seed)
    N = sum(lengths)
    return dict(
        hidden=torch.randn(N, H, generator=g),
        weight=torch.randn(V, H, generator=g) * 0.3,
        targets=torch.randint(0, V, (N,), generator=g),
        advantages=torch.randn(len(lengths), generator=g),
        old_logps=-torch.rand(N, generator=g) - 1,
        mask=None,
    ), N


def test_packed_base_is_valid():
    a, N = packed()
    assert torch.isfinite(call(a, cu_seqlens=torch.tensor([0, 3, 3, 9, 11]))[0])
    assert torch.isfinite(call(a, seq_ids=torch.tensor([0] * 3 + [2] * 6 + [3] * 2))[0])


@pytest.mark.parametrize("cu,name,seen", [
    ([1, 3, 3, 9, 11], "cu_seqlens", "[1, 3, 3, 9, 11]"),   # does not start at 0
    ([0, 3, 3, 9, 10], "cu_seqlens", "[0, 3, 3, 9, 10]"),   # does not end at N
    ([0, 3, 2, 9, 11], "cu_seqlens", "[0, 3, 2, 9, 11]"),   # decreasing
    ([0, 3, 9, 11], "advantages", "(4,)"),                  # 3 sequences for 4 advantages
])
def test_bad_cu_seqlens(cu, name, seen):
    a, N = packed()
    raises(lambda: call(a, cu_seqlens=torch.tensor(cu)), name, seen)


def test_bad_cu_seqlens_types():
    a, N = packed()
    raises(lambda: call(a, cu_seqlens=torch.tensor([0.0, 3, 3, 9, 11])), "cu_seqlens", "float32")
    raises(lambda: call(a, cu_seqlens=torch.tensor([[0, 3, 3, 9, 11]])), "cu_seqlens")
    raises(lambda: call(a, cu_seqlens=[0, 3, 3, 9, 11]), "cu_seqlens")


@pytest.mark.parametrize("ids,seen", [
    ([0] * 3 + [2] * 6 + [3], "(10,)"),             # wrong length
    ([0] * 3 + [3] * 6 + [2] * 2, "non-decreasing"),  # not one run per sequence
    ([0] * 3 + [2] * 6 + [4] * 2, "4"),             # >= B
    ([-1] * 3 + [2] * 6 + [3] * 2, "-1"),           # negative
])
def test_bad_seq_ids(ids, seen):
    a, N = packed()
    raises(lambda: call(a, seq_ids=torch.tensor(ids)), "seq_ids", seen)


def test_bad_seq_ids_types_and_combinations():
    a, N = packed()
    ids = torch.tensor([0] * 3 + [2] * 6 + [3] * 2)
    raises(lambda: call(a, seq_ids=ids.float()), "seq_ids", "float32")
    raises(lambda: call(a, seq_ids=ids, cu_seqlens=torch.tensor([0, 3, 3, 9, 11])), "seq_ids")
    raises(lambda: call(a), "seq_ids")  # 4 advantages, no way to split the tokens
    bt = base()
    raises(lambda: call(bt, seq_ids=torch.zeros(B * T, dtype=torch.int64)), "seq_ids")
    raises(lambda: call(bt, cu_seqlens=torch.tensor([0, B * T])), "cu_seqlens")


# ------------------------------------------------------------------------------------------------
# policy_loss / opo_loss, escort_weights, group_advantages
# ------------------------------------------------------------------------------------------------

def test_policy_loss_bad_inputs():
    a = base()
    lp = -torch.rand(B, T)
    raises(lambda: opo_loss(lp.long(), a["old_logps"], a["advantages"]), "logps", "int64")
    raises(lambda: opo_loss(lp.reshape(1, B, T), None, a["advantages"]), "logps", "(1, 4, 5)")
    raises(lambda: opo_loss(lp, a["old_logps"][:, :2], a["advantages"]), "old_logps", "(4, 2)")
    raises(lambda: opo_loss(lp, None, a["advantages"][:3]), "advantages", "3")
    raises(lambda: opo_loss(lp, None, a["advantages"], torch.full((B, T), 0.3)), "mask")
    raises(lambda: opo_loss(lp, None, a["advantages"], alpha=2.0), "alpha", "2.0")
    raises(lambda: opo_loss(lp, None, a["advantages"], level="batch"), "level", "'batch'")
    raises(lambda: policy_loss(lp, None, a["advantages"], loss="reinforce"), "loss", "'reinforce'")
    raises(lambda: opo_loss(lp, None, a["advantages"], alhpa=0.5), "alhpa")
    raises(lambda: opo_loss(lp, None, a["advantages"], escort="group_softmax", group_size=2),
           "vocab_size")
    bad = a["old_logps"].clone()
    bad[0, 0] = math.nan
    raises(lambda: opo_loss(lp, bad, a["advantages"]), "old_logps")
    raises(lambda: opo_loss(lp.to("meta"), None, a["advantages"]), "advantages", "meta")


def test_escort_weights_bad_inputs():
    adv = torch.randn(6)
    raises(lambda: escort_weights(adv, alpha=1.2), "alpha", "1.2")
    raises(lambda: escort_weights(adv, tau=0.0), "tau", "0.0")
    raises(lambda: escort_weights(adv, normalize="minmax"), "normalize", "'minmax'")
    raises(lambda: escort_weights(adv, norm_scope="prompt"), "norm_scope", "'prompt'")
    raises(lambda: escort_weights(adv, norm_scope="group", group_size=4), "group_size", "4")
    raises(lambda: escort_weights(adv, norm_scope="group"), "group_size", "None")


def test_group_advantages_bad_inputs():
    r = torch.rand(6)
    raises(lambda: group_advantages(r, 4), "group_size", "4")
    raises(lambda: group_advantages(r, 0), "group_size", "0")
    raises(lambda: group_advantages(r, 3, scale="rank"), "scale", "'rank'")
    raises(lambda: group_advantages(r.reshape(2, 3), 3), "rewards", "(2, 3)")
    bad = r.clone()
    bad[2] = math.nan
    raises(lambda: group_advantages(bad, 3), "rewards")


def test_messages_are_specific():
    """The message names the offending argument, not a generic 'bad input'."""
    msg = raises(lambda: call(with_(targets=torch.randint(0, V, (B, T), dtype=torch.int32))), "targets")
    assert re.search(r"int64", msg), msg


# ------------------------------------------------------------------------------------------------
# Options: every value checked, and an option the chosen loss does not read must not be changed
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss,name,value", [
    ("grpo", "alpha", 0.7), ("grpo", "mu", 2.0), ("grpo", "tau", 0.5), ("grpo", "level", "token"),
    ("grpo", "ratio", "exact"), ("grpo", "max_log_ratio", 0.1), ("grpo", "ref_correction", True),
    ("grpo", "normalize", "center"), ("dapo", "norm_scope", "group"), ("gspo", "escort", "group_softmax"),
    ("dr_grpo", "seq_reduce", "sum"), ("gspo", "beta_r", 0.3), ("grpo", "adaptive_tau", False),
    ("opo", "clip_eps_low", 0.1), ("opo", "clip_eps_high", 0.3), ("opo", "beta_r", 0.3),
    ("opo", "adaptive_tau", False),
])
def test_option_the_loss_does_not_read_raises(loss, name, value):
    raises(lambda: call(base(), loss=loss, **{name: value}), name, repr(value), loss)


@pytest.mark.parametrize("name,value", [("level", "token"), ("ratio", "exact"),
                                        ("normalize", "center"), ("ref_correction", True),
                                        ("seq_reduce", "sum")])
def test_option_group_softmax_does_not_read_raises(name, value):
    raises(lambda: call(base(), escort="group_softmax", group_size=2, **{name: value}), name,
           "group_softmax")


def test_seq_reduce_at_token_level_needs_ref_correction():
    raises(lambda: call(base(), level="token", seq_reduce="sum"), "seq_reduce", "token")
    assert torch.isfinite(call(base(), level="token", seq_reduce="sum", ref_correction=True)[0])


def test_options_the_loss_reads_at_their_defaults_are_accepted():
    """A trainer may pass every option with its default whatever the loss (and the batch facts
    group_size and max_completion_length)."""
    defaults = dict(alpha=0.4, mu=1.0, tau=1.0, level="sequence", seq_reduce="mean", ratio="log",
                    normalize="zscore", norm_scope="batch", ref_correction=False,
                    max_log_ratio=None, escort="paper", clip_eps_low=None, clip_eps_high=None,
                    beta_r=0.15, adaptive_tau=True, group_size=2, max_completion_length=8)
    for loss in ("opo", "grpo", "dapo", "gspo", "dr_grpo"):
        assert torch.isfinite(call(base(), loss=loss, **defaults)[0])


@pytest.mark.parametrize("loss,name,value", [
    ("grpo", "clip_eps_low", 1.5), ("grpo", "clip_eps_low", 1.0), ("grpo", "clip_eps_high", math.inf),
    ("opo", "temperature", math.inf), ("opo", "mu", math.inf), ("opo", "tau", math.inf),
    ("opo", "alpha", math.inf), ("opo", "max_log_ratio", math.inf), ("opo", "max_log_ratio", 0.0),
    ("opo", "group_size", 2.5), ("opo", "ref_correction", 1), ("dr_grpo", "max_completion_length", 0),
])
def test_bad_option_value(loss, name, value):
    raises(lambda: call(base(), loss=loss, **{name: value}), name, repr(value))


def test_group_size_must_divide_the_batch_whatever_the_scope():
    raises(lambda: call(base(), group_size=3), "group_size", "3")


def test_unknown_option_name():
    raises(lambda: call(base(), alpah=0.3), "alpah")
    raises(lambda: call(base(), fn=fused_opo_loss, alpah=0.3), "alpah")
    raises(lambda: opo_loss(-torch.rand(B, T), None, torch.randn(B), alpah=0.3), "alpah")


@pytest.mark.parametrize("backend,name,value", [
    ("torch", "filter_eps", 0.01), ("reference", "deterministic", True), ("fused", "chunk_size", 8),
    ("reference", "chunk_size", 8), ("fused", "filter_eps", -1.0), ("torch", "deterministic", 1),
])
def test_backend_options_go_with_their_backend(backend, name, value):
    raises(lambda: call(base(), backend=backend, **{name: value}), name, repr(value))


def test_module_constructors_validate():
    raises(lambda: FusedOPOLoss(alpah=0.3), "alpah")
    raises(lambda: FusedOPOLoss(mu=-1.0), "mu", "-1.0")
    raises(lambda: FusedOPOLoss(clip_eps_low=0.1), "clip_eps_low", "opo")
    raises(lambda: FusedPolicyLoss("grpo", alpha=0.7), "alpha", "grpo")
    raises(lambda: FusedPolicyLoss("ppo"), "loss", "'ppo'")
    raises(lambda: FusedOPOLoss(temperature=0.0), "temperature")
    raises(lambda: FusedOPOLoss(backend="gpu"), "backend", "'gpu'")
    raises(lambda: FusedOPOLoss(filter_eps=-1.0), "filter_eps")


def test_module_forward_loss_override_is_a_clear_error():
    a = base()
    msg = raises(lambda: FusedOPOLoss()(a["hidden"], a["weight"], a["targets"], a["advantages"],
                                        loss="grpo"), "loss")
    assert "multiple values" not in msg


def test_zero_hidden_size():
    a = base()
    raises(lambda: call(with_(hidden=torch.randn(B, T, 0), weight=torch.randn(V, 0))), "H", "(37, 0)")
    raises(lambda: linear_logprobs(torch.randn(B, T, 0), torch.randn(V, 0), a["targets"]), "H")


def test_escort_weights_checks_its_advantages():
    raises(lambda: escort_weights(torch.randn(2, 3)), "advantages", "(2, 3)")
    adv = torch.randn(6)
    adv[2] = math.nan
    raises(lambda: escort_weights(adv), "advantages", "nan")
    valid = torch.ones(6, dtype=torch.bool)
    valid[2] = False
    w = escort_weights(adv, valid=valid)  # an invalid sequence may hold anything
    assert torch.isfinite(w).all() and w[2] == 0
