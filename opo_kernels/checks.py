"""Every validation rule of the package, written once: options, layouts, tensors, values.

The public functions call these checks on entry and nothing below them checks again. Each error
is a ``ValueError`` or ``TypeError`` whose message names the argument and the value or shapes
seen. The options and loss types they rule are declared in :mod:`opo_kernels.options`; the
rule of one option's value is declared there and interpreted here (:func:`check_value`). See
``docs/contract.md`` ("Bad input").
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .options import (BACKEND_OPTIONS, DEFAULTS, ESCORT_OPTIONS, LOSS_OPTIONS, Agg, Option,
                      counts_read, used_options)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_choice(name: str, value, choices) -> None:
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _number(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__} {v!r}")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v!r}")


def check_positive(name: str, v) -> None:
    """A finite number > 0."""
    _number(name, v)
    if not v > 0:
        raise ValueError(f"{name} must be > 0, got {v!r}")


def _flag(name, v):
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {type(v).__name__} {v!r}")


def positive_int(name: str, v, *, none_ok: bool = True) -> None:
    if v is None and none_ok:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if none_ok else ''}, got {v!r}")


def check_value(opt: Option, v) -> None:
    """One option's value against its declared rule (:class:`opo_kernels.options.Rule`)."""
    rule, name = opt.rule, opt.name
    if v is None and rule.optional:
        return
    if rule.kind == "choice":
        check_choice(name, v, rule.choices)
    elif rule.kind == "flag":
        _flag(name, v)
    elif rule.kind == "count":
        positive_int(name, v, none_ok=rule.optional)
    else:
        _number(name, v)
        lo_bad = rule.low is not None and (v <= rule.low if "low" in rule.open else v < rule.low)
        hi_bad = rule.high is not None and (v >= rule.high if "high" in rule.open else v > rule.high)
        if lo_bad or hi_bad:
            why = f" ({rule.why})" if rule.why else ""
            raise ValueError(f"{name} must be {rule.text()}{why}, got {v!r}")


def check_options(o) -> None:
    """Each option's value, what goes with what, and that no option the chosen loss type does not
    read was changed. ``o``: :class:`opo_kernels.options.LossOptions`."""
    for opt in LOSS_OPTIONS:
        check_value(opt, getattr(o, opt.name))
    if o.is_correction is not None:
        if o.is_clip_min is None and o.is_clip_max is None:
            raise ValueError("is_correction needs is_clip_max or is_clip_min (or both), got both None")
        if o.is_clip_min is not None and o.is_clip_max is not None and o.is_clip_min > o.is_clip_max:
            raise ValueError(f"is_clip_min={o.is_clip_min!r} must be <= is_clip_max={o.is_clip_max!r}")
    used = used_options(o)
    for opt in LOSS_OPTIONS:
        v = getattr(o, opt.name)
        if opt.name not in used and v != opt.default:
            raise ValueError(f"{opt.name}={v!r} has no effect with {o.kind.describe(o)}: leave it at "
                             f"its default {opt.default!r}")
    if o.norm_scope == "group" and o.group_size is None:
        raise ValueError("norm_scope='group' needs group_size (the G of each prompt group), got None")
    if o.kind.aggregate is Agg.GROUP_MEAN:
        if o.group_size is None:
            raise ValueError(f"{o.kind.describe(o)} needs group_size (the G of each prompt group), "
                             "got None")
        if o.alpha == 0:
            raise ValueError(f"{o.kind.describe(o)} scales by 1/alpha: alpha must be > 0, got 0")


def check_group_size(group_size, B: int) -> None:
    if group_size is not None and B % group_size:
        raise ValueError(f"group_size must divide the number of sequences B={B}, got "
                         f"group_size={group_size!r}")


def check_ignore_index(ignore_index) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")


def check_backend_options(bo, backend: str | None = None) -> None:
    """The backend options ``bo`` (:class:`opo_kernels.options.BackendOptions`): each value, and
    that none the concrete ``backend`` does not read was changed (None: not known yet, e.g. "auto"
    before the device is seen: then only the values are checked)."""
    for opt in BACKEND_OPTIONS:
        check_value(opt, getattr(bo, opt.name))
    if backend is None or backend == "auto":
        return
    for opt in BACKEND_OPTIONS:
        v = getattr(bo, opt.name)
        if backend not in opt.read_by and v != opt.default:
            readers = ", ".join(repr(b) for b in sorted(opt.read_by))
            raise ValueError(f"{opt.name}={v!r} applies to backend {readers} only, got "
                             f"backend={backend!r}: leave it at its default {opt.default!r}")


def check_triton_device(device: torch.device, what: str, interpreted: bool | None = None) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter (``interpreted``:
    whether the kernels were built for it; default: ``TRITON_INTERPRET=1`` is set)."""
    if interpreted is None:
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cuda" or (device.type == "cpu" and interpreted):
        return
    raise ValueError(f"{what} runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was "
                     f"set before opo_kernels was imported; got tensors on {device} "
                     f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r})")


# Log-probs are ≤ 0; fp32 rounding of z_t − logsumexp(z) can leave a confident token's value a
# few ulp of |logits| above 0. 2^-9 is 2 ulp of fp32 at |logits| < 2^13: anything larger is not
# a log-prob (e.g. an NLL passed with the wrong sign).
LOGP_TOL = 2.0 ** -9


class DeviceChecks:
    """The value rules of one call, evaluated on the device and read back with one host
    synchronization (:meth:`read`).

    :meth:`add` takes a 0-d tensor on any device — a rule's flag (set: the rule is broken) with
    the function raising its error, or, with ``fail=None``, a value the caller wants on the host —
    and returns its index in :meth:`read`'s list. :meth:`read` raises the error of the first
    broken rule, in the order they were added; an error function may read the tensors again to
    show example values (a second synchronization, on the failure path only).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._vals, self._fails = [], []

    def add(self, t: torch.Tensor, fail=None) -> int:
        self._vals.append(t.detach().reshape(()).to(self.device, torch.float64))
        self._fails.append(fail)
        return len(self._vals) - 1

    def read(self) -> list[float]:
        res = torch.stack(self._vals).tolist() if self._vals else []
        for r, fail in zip(res, self._fails):
            if fail is not None and r:
                fail()
        return res


def _raiser(exc: Exception):
    def fail():
        raise exc
    return fail


def add_logp_rules(name: str, t: torch.Tensor, valid: torch.Tensor, dc: DeviceChecks) -> None:
    """Log-probs ``t`` finite and ≤ LOGP_TOL wherever ``valid`` (N,) bool."""
    x = t.detach().reshape(-1).float()

    def positive():
        vals = x[valid & (x > LOGP_TOL)][:5].tolist()
        raise ValueError(f"{name} must be log-probs (<= 0, up to rounding {LOGP_TOL:g}) at valid "
                         f"positions, got e.g. {vals} (negative log-likelihoods passed as log-probs?)")
    dc.add((valid & ~torch.isfinite(x)).any(),
           _raiser(ValueError(f"{name} must be finite at valid positions, got NaN/inf")))
    dc.add((valid & (x > LOGP_TOL)).any(), positive)


def check_logps(logps) -> None:
    """The per-token log-probs of :func:`opo_kernels.policy_loss`: a float (B, T) or (N,) tensor
    (its values: :func:`add_logp_rules`)."""
    if not isinstance(logps, torch.Tensor) or not logps.is_floating_point():
        raise TypeError(f"logps must be a float tensor, got {getattr(logps, 'dtype', type(logps).__name__)}")
    if logps.dim() not in (1, 2):
        raise ValueError(f"logps must be (B, T) or (N,), got {tuple(logps.shape)}")


def _shape(t):
    return tuple(t.shape)


@dataclass
class Layout:
    """Token layout of a batch: N tokens, B sequences, each a run of consecutive tokens."""
    N: int
    B: int
    lengths: list[int]          # tokens per sequence
    lengths_t: torch.Tensor     # (B,) int64 on the device
    seq: torch.Tensor           # (N,) int64 on the device
    T: int | None               # padded length for (B, T) inputs


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_linear(hidden, weight, bias, targets) -> None:
    """Types, dtypes, devices and shapes of the LM-head inputs."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        check_tensor(name, t)
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32/bfloat16/float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be int64, got {targets.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (B, T, H) or (N, H), got shape {_shape(hidden)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {_shape(weight)}")
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"weight must be (V, H) with V >= 1 and H >= 1, got {_shape(weight)}")
    if _shape(targets) != _shape(hidden)[:-1]:
        raise ValueError(f"targets shape {_shape(targets)} must equal hidden.shape[:-1] = "
                         f"{_shape(hidden)[:-1]}")
    devs = {("hidden", hidden.device), ("weight", weight.device), ("targets", targets.device)}
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
        if _shape(bias) != (weight.shape[0],):
            raise ValueError(f"bias must be (V,) = ({weight.shape[0]},), got {_shape(bias)}")
        devs.add(("bias", bias.device))
    _same_device(devs)


def _same_device(pairs):
    devices = {d for _, d in pairs}
    if len(devices) > 1:
        raise ValueError("all tensors must be on one device, got " +
                         ", ".join(f"{n} on {d}" for n, d in sorted(pairs, key=lambda p: p[0])))


def layout(targets: torch.Tensor, n_adv: int | None, seq_ids, cu_seqlens) -> Layout:
    """Sequences of a (B, T) or packed (N,) batch, validated."""
    dev = targets.device
    if targets.dim() == 2:
        if seq_ids is not None or cu_seqlens is not None:
            raise ValueError("seq_ids / cu_seqlens are for packed (N, H) inputs; got (B, T) targets "
                             f"{_shape(targets)}")
        B, T = targets.shape
        if n_adv is not None and n_adv != B:
            raise ValueError(f"advantages must have one value per sequence: expected ({B},), got ({n_adv},)")
        seq = torch.arange(B, device=dev).repeat_interleave(T)
        return Layout(N=B * T, B=B, lengths=[T] * B, lengths_t=torch.full((B,), T, device=dev),
                      seq=seq, T=T)
    N = targets.shape[0]
    if seq_ids is not None and cu_seqlens is not None:
        raise ValueError("give seq_ids or cu_seqlens, not both")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or \
                cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be a 1-D int32/int64 tensor, got "
                            f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} "
                            f"{_shape(cu_seqlens) if isinstance(cu_seqlens, torch.Tensor) else ''}")
        cu = cu_seqlens.tolist()
        if len(cu) < 1 or cu[0] != 0 or cu[-1] != N or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at N={N}, got {cu}")
        lengths = [b - a for a, b in zip(cu, cu[1:])]
    elif seq_ids is not None:
        if not isinstance(seq_ids, torch.Tensor) or seq_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"seq_ids must be an int32/int64 tensor, got "
                            f"{getattr(seq_ids, 'dtype', type(seq_ids).__name__)}")
        if _shape(seq_ids) != (N,):
            raise ValueError(f"seq_ids must be (N,) = ({N},), got {_shape(seq_ids)}")
        B = n_adv if n_adv is not None else (int(seq_ids.max()) + 1 if N else 0)
        lengths = [0] * B
        if N:
            # the rules and the lengths in one read-back
            ids = seq_ids.to(torch.int64)
            counts = torch.zeros(B, dtype=torch.int64, device=dev)
            if B:
                counts.index_add_(0, ids.clamp(0, B - 1), torch.ones_like(ids))
            res = torch.cat([torch.stack([(ids < 0).any(), (ids >= B).any(),
                                          (ids[1:] < ids[:-1]).any()]).long(), counts]).tolist()
            if res[0] or res[1]:
                raise ValueError(f"seq_ids must lie in [0, B={B}) (B = len(advantages)), got values in "
                                 f"[{int(ids.min())}, {int(ids.max())}]")
            if res[2]:
                raise ValueError("seq_ids must be non-decreasing (each sequence one run of tokens)")
            lengths = res[3:]
    else:
        if n_adv is not None and n_adv != 1:
            raise ValueError(f"packed (N, H) inputs need seq_ids or cu_seqlens to split {n_adv} "
                             "sequences (advantages has more than one value)")
        lengths = [N]
    B = len(lengths)
    if n_adv is not None and n_adv != B:
        raise ValueError(f"advantages must have one value per sequence: expected ({B},), got ({n_adv},)")
    lengths_t = torch.tensor(lengths, dtype=torch.int64, device=dev)
    seq = torch.repeat_interleave(torch.arange(B, device=dev), lengths_t, output_size=N)
    return Layout(N=N, B=B, lengths=lengths, lengths_t=lengths_t, seq=seq, T=None)


def valid_mask(targets: torch.Tensor, mask, ignore_index: int, dc: DeviceChecks) -> torch.Tensor:
    """(N,) fp32 0/1: ``mask`` (if given) and ``targets != ignore_index``; the rule on the mask's
    values goes to ``dc``."""
    m = targets != ignore_index
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a tensor or None, got {type(mask).__name__}")
        if _shape(mask) != _shape(targets):
            raise ValueError(f"mask shape {_shape(mask)} must equal targets shape {_shape(targets)}")
        if mask.device != targets.device:
            raise ValueError(f"mask is on {mask.device}, targets on {targets.device}")
        if mask.dtype != torch.bool:
            if mask.is_floating_point() or mask.dtype in (torch.int8, torch.int16, torch.int32,
                                                          torch.int64, torch.uint8):
                other = (mask != 0) & (mask != 1)

                def bad_mask():
                    raise ValueError(f"mask must hold only 0 and 1 (or be bool), got e.g. "
                                     f"{mask[other][:5].tolist()}")
                dc.add(other.any(), bad_mask)
            else:
                raise TypeError(f"mask must be bool or 0/1 numbers, got {mask.dtype}")
        m = m & mask.to(torch.bool)
    return m.reshape(-1).float()


def _bad_targets(t, V, valid):
    vals = t[valid & ((t < 0) | (t >= V))][:5].tolist()
    raise ValueError(f"targets must be in [0, V={V}) at valid positions, got e.g. {vals}")


def check_targets(targets, V: int, valid, dc: DeviceChecks) -> int:
    """targets (N,) in [0, V) wherever ``valid`` (N,) bool, a rule on ``dc``; returns the index
    of the flag "some position is not valid" in ``dc.read()``."""
    dc.add((valid & ((targets < 0) | (targets >= V))).any(), lambda: _bad_targets(targets, V, valid))
    return dc.add((~valid).any())


def check_values(targets, V, mask, advantages, old_logps, lay: Layout, dc: DeviceChecks) -> int:
    """The value rules at valid positions (targets, advantages, old_logps), added to ``dc``.

    Returns the index of the flag "some position is masked" in ``dc.read()`` (the caller then
    keeps those rows out of the GEMMs).
    """
    t = targets.reshape(-1)
    valid = mask > 0
    masked = check_targets(t, V, valid, dc)
    seq_valid = torch.zeros(lay.B, dtype=torch.float32, device=t.device).index_add_(
        0, lay.seq, mask) > 0
    bad_a = seq_valid & ~torch.isfinite(advantages.float())

    def bad_advantages():
        raise ValueError(f"advantages must be finite for sequences with valid tokens, got e.g. "
                         f"{advantages[bad_a][:5].tolist()}")
    dc.add(bad_a.any(), bad_advantages)
    if old_logps is not None:
        add_logp_rules("old_logps", old_logps, valid, dc)
    return masked


def check_loss_tensors(advantages, old_logps, targets) -> None:
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    if not advantages.is_floating_point():
        raise TypeError(f"advantages must be a float tensor, got {advantages.dtype}")
    if advantages.dim() != 1:
        raise ValueError(f"advantages must be (B,), one per sequence, got {_shape(advantages)}")
    if advantages.device != targets.device:
        raise ValueError(f"advantages is on {advantages.device}, targets on {targets.device}")
    if old_logps is not None:
        if not isinstance(old_logps, torch.Tensor):
            raise TypeError(f"old_logps must be a tensor or None, got {type(old_logps).__name__}")
        if not old_logps.is_floating_point():
            raise TypeError(f"old_logps must be a float tensor, got {old_logps.dtype}")
        if _shape(old_logps) != _shape(targets):
            raise ValueError(f"old_logps shape {_shape(old_logps)} must equal targets shape "
                             f"{_shape(targets)}")
        if old_logps.device != targets.device:
            raise ValueError(f"old_logps is on {old_logps.device}, targets on {targets.device}")


def check_escort_inputs(advantages, valid, anchor_seq_logps) -> None:
    """The tensors of :func:`opo_kernels.escort_weights`: (B,) float, finite where valid."""
    if not isinstance(advantages, torch.Tensor) or not advantages.is_floating_point():
        raise TypeError(f"advantages must be a float tensor, got "
                        f"{getattr(advantages, 'dtype', type(advantages).__name__)}")
    if advantages.dim() != 1:
        raise ValueError(f"advantages must be (B,), one per sequence, got {_shape(advantages)}")
    B = advantages.shape[0]
    ok = torch.ones(B, dtype=torch.bool, device=advantages.device)
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or _shape(valid) != (B,):
            raise ValueError(f"valid must be a (B,) = ({B},) tensor, got "
                             f"{_shape(valid) if isinstance(valid, torch.Tensor) else type(valid).__name__}")
        ok = valid.to(torch.bool)
    dc = DeviceChecks(advantages.device)
    if anchor_seq_logps is not None:
        if not isinstance(anchor_seq_logps, torch.Tensor) or _shape(anchor_seq_logps) != (B,):
            raise ValueError(f"anchor_seq_logps must be a (B,) = ({B},) tensor, got "
                             f"{_shape(anchor_seq_logps) if isinstance(anchor_seq_logps, torch.Tensor) else type(anchor_seq_logps).__name__}")
        bad_l = ok & ~torch.isfinite(anchor_seq_logps.float())

        def bad_anchor():
            raise ValueError(f"anchor_seq_logps must be finite for valid sequences, got e.g. "
                             f"{anchor_seq_logps[bad_l][:5].tolist()}")
        dc.add(bad_l.any(), bad_anchor)
    bad = ok & ~torch.isfinite(advantages.float())

    def bad_advantages():
        raise ValueError(f"advantages must be finite for valid sequences, got e.g. "
                         f"{advantages[bad][:5].tolist()}")
    dc.add(bad.any(), bad_advantages)
    dc.read()


def check_rewards(rewards, group_size, scale) -> None:
    """The arguments of :func:`opo_kernels.group_advantages`."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor, got {type(rewards).__name__} "
                         f"{tuple(getattr(rewards, 'shape', ()))}")
    if not isinstance(group_size, int) or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group_size must be a positive int dividing len(rewards)={rewards.numel()}, "
                         f"got {group_size!r}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if scale == "group" and group_size < 2:
        raise ValueError("scale='group' needs group_size >= 2 (the unbiased std of one sample is undefined)")
    if not bool(torch.isfinite(rewards.float()).all()):
        raise ValueError(f"rewards must be finite, got {rewards.tolist()}")


def _count_value(name, v):
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
    return float(v)


def _count(name, v, dc: DeviceChecks):
    """A global count (int, float or one-element tensor) ≥ 0, or None. Returns a function of
    ``dc.read()``'s list giving it as a float (a tensor's value is read back with the rules)."""
    if v is None:
        return lambda _res: None
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {_shape(v)}")
        i = dc.add(v)
        return lambda res: _count_value(name, res[i])
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number or a one-element tensor, got {type(v).__name__} {v!r}")
    v = _count_value(name, v)
    return lambda _res: v


def check_rl_inputs(o, targets, mask_valid, n_seqs: int, dc: DeviceChecks, *, omega=None,
                    ref_logps=None, rollout_logps=None, num_items_in_batch=None,
                    num_seqs_in_batch=None):
    """The per-call inputs of the RL terms (docs/contract.md, "RL terms"): shapes, dtypes, devices,
    finite values at valid positions (``mask_valid`` (N,) bool; rules added to ``dc``), and what
    goes with what. Returns the function that, given ``dc.read()``'s list, checks the global
    counts and returns ``(num_items, num_seqs)`` as floats or None."""
    for name, t in (("ref_logps", ref_logps), ("rollout_logps", rollout_logps)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor or None, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if _shape(t) != _shape(targets):
            raise ValueError(f"{name} shape {_shape(t)} must equal targets shape {_shape(targets)}")
        if t.device != targets.device:
            raise ValueError(f"{name} is on {t.device}, targets on {targets.device}")
        add_logp_rules(name, t, mask_valid, dc)
    if o.beta > 0 and ref_logps is None:
        raise ValueError(f"beta={o.beta!r} > 0 needs ref_logps (the reference model's log-probs)")
    if o.is_correction is not None and rollout_logps is None:
        raise ValueError(f"is_correction={o.is_correction!r} needs rollout_logps (the rollout engine's "
                         "log-probs of the sampled tokens)")
    if omega is not None:
        if not o.kind.escort:
            raise ValueError(f"omega (fixed escort weights) applies to the loss types with escort "
                             f"weights (loss='opo', escort='paper') only, got {o.kind.describe(o)}")
        if not isinstance(omega, torch.Tensor) or not omega.is_floating_point():
            raise TypeError(f"omega must be a float tensor or None, got "
                            f"{getattr(omega, 'dtype', type(omega).__name__)}")
        if _shape(omega) != (n_seqs,):
            raise ValueError(f"omega must be (B,) = ({n_seqs},), one weight per sequence, got {_shape(omega)}")
        if omega.device != targets.device:
            raise ValueError(f"omega is on {omega.device}, targets on {targets.device}")
        changed = [n for n in ESCORT_OPTIONS if getattr(o, n) != getattr(DEFAULTS, n)]
        if changed:
            raise ValueError(f"omega is given, so the escort options {changed} have no effect (they are "
                             "escort_weights' arguments): leave them at their defaults")
    items = _count("num_items_in_batch", num_items_in_batch, dc)
    seqs = _count("num_seqs_in_batch", num_seqs_in_batch, dc)

    def counts(res):
        ni, ns = items(res), seqs(res)
        if (ni is not None or ns is not None) and o.kind.divides_by is None:
            raise ValueError(f"num_items_in_batch / num_seqs_in_batch do not apply to {o.kind.describe(o)} "
                             "(its weights and adaptive τ need whole groups in one call)")
        reads = counts_read(o)
        for name, v, read in (("num_items_in_batch", ni, reads[0]), ("num_seqs_in_batch", ns, reads[1])):
            if v is not None and not read:
                what = f"{o.kind.describe(o)}, entropy_coef={o.entropy_coef!r}"
                raise ValueError(f"{name}={v!r} has no effect with {what} (no mean of the loss divides "
                                 f"by it): leave it None")
        return ni, ns
    return counts


def check_completion_length(o, mask: torch.Tensor, lengths: torch.Tensor, dc: DeviceChecks) -> None:
    """A loss type that divides by ``max_completion_length`` (dr_grpo): no sequence may have more
    valid tokens than that (a rule on ``dc``). mask (N,) fp32 0/1; lengths (B,) int64 tokens per
    sequence."""
    if o.kind.aggregate is not Agg.MAX_LENGTH or o.max_completion_length is None or mask.numel() == 0:
        return
    longest = torch.segment_reduce(mask, "sum", lengths=lengths, unsafe=True).max()

    def too_long():
        raise ValueError(f"max_completion_length={o.max_completion_length!r} is shorter than a "
                         f"sequence of the batch ({int(longest)} valid tokens); dr_grpo divides by "
                         "B · max_completion_length, the longest completion the sampler may produce")
    dc.add(longest > o.max_completion_length, too_long)


def check_process_group(process_group) -> None:
    """None or a ``torch.distributed.ProcessGroup``."""
    if process_group is None:
        return
    import torch.distributed as dist
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"process_group must be None or a torch.distributed.ProcessGroup, got "
                        f"{type(process_group).__name__} {process_group!r}")


def check_omega_values(omega, seq_valid, dc: DeviceChecks) -> None:
    """omega finite for sequences with a valid token (``seq_valid`` (B,) bool), a rule on ``dc``."""
    if omega is not None:
        dc.add((seq_valid & ~torch.isfinite(omega.float())).any(),
               _raiser(ValueError("omega must be finite for sequences with valid tokens, got NaN/inf")))


def check_entropy_tensor(entropy, logps, mask_valid, dc: DeviceChecks) -> None:
    """The per-token entropies of :func:`opo_kernels.policy_loss`: float, like ``logps``, finite
    where valid (a rule on ``dc``)."""
    if not isinstance(entropy, torch.Tensor) or not entropy.is_floating_point():
        raise TypeError(f"entropy must be a float tensor or None, got "
                        f"{getattr(entropy, 'dtype', type(entropy).__name__)}")
    if _shape(entropy) != _shape(logps):
        raise ValueError(f"entropy shape {_shape(entropy)} must equal logps shape {_shape(logps)}")
    dc.add((mask_valid & ~torch.isfinite(entropy.reshape(-1).float())).any(),
           _raiser(ValueError("entropy must be finite at valid positions, got NaN/inf")))
