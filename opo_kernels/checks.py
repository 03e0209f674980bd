"""Input validation for the public API (SPEC §6): clear errors naming the argument, no clamping.

Every check that needs tensor values is batched into as few device syncs as possible.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .losses import ESCORTS, LOSSES, LossOptions

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _shape(t):
    return tuple(t.shape)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_options(o: LossOptions) -> None:
    check_choice("loss", o.loss, LOSSES)
    check_choice("level", o.level, ("sequence", "token"))
    check_choice("seq_reduce", o.seq_reduce, ("mean", "sum"))
    check_choice("ratio", o.ratio, ("log", "exact"))
    check_choice("normalize", o.normalize, ("zscore", "center"))
    check_choice("norm_scope", o.norm_scope, ("batch", "group"))
    check_choice("escort", o.escort, ESCORTS)
    _number("alpha", o.alpha)
    if not 0.0 <= o.alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {o.alpha!r}")
    for name in ("mu", "tau", "beta_r"):
        v = getattr(o, name)
        _number(name, v)
        if not v > 0:
            raise ValueError(f"{name} must be > 0, got {v!r}")
    if o.max_log_ratio is not None:
        _number("max_log_ratio", o.max_log_ratio)
        if not o.max_log_ratio > 0:
            raise ValueError(f"max_log_ratio must be > 0 or None, got {o.max_log_ratio!r}")
    for name in ("clip_eps_low", "clip_eps_high"):
        v = getattr(o, name)
        if v is not None:
            _number(name, v)
            if not v >= 0:
                raise ValueError(f"{name} must be >= 0 or None, got {v!r}")
    if o.group_size is not None and (not isinstance(o.group_size, int) or isinstance(o.group_size, bool)
                                     or o.group_size < 1):
        raise ValueError(f"group_size must be a positive int or None, got {o.group_size!r}")
    if o.escort == "group_softmax":
        if o.loss != "opo":
            raise ValueError(f"escort='group_softmax' is an OPO weighting; got loss={o.loss!r}")
        if o.group_size is None:
            raise ValueError("escort='group_softmax' needs group_size (the G of each prompt group)")
        if o.alpha == 0:
            raise ValueError("escort='group_softmax' scales by 1/alpha: alpha must be > 0, got 0")
    if o.max_completion_length is not None and (not isinstance(o.max_completion_length, int)
                                                or o.max_completion_length < 1):
        raise ValueError(f"max_completion_length must be a positive int or None, got "
                         f"{o.max_completion_length!r}")


def _number(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__} {v!r}")


def check_scalar_positive(name: str, v) -> None:
    _number(name, v)
    if not v > 0:
        raise ValueError(f"{name} must be > 0, got {v!r}")


@dataclass
class Layout:
    """Token layout of a batch: N tokens, B sequences, each a run of consecutive tokens."""
    N: int
    B: int
    lengths: list[int]          # tokens per sequence
    lengths_t: torch.Tensor     # (B,) int64 on the device
    seq: torch.Tensor           # (N,) int64 on the device
    T: int | None               # padded length for (B, T) inputs


def check_linear(hidden, weight, bias, targets) -> None:
    """Types, dtypes, devices and shapes of the LM-head inputs."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
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
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have at least one vocabulary row, got {_shape(weight)}")
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
        if N:
            ids = seq_ids.to(torch.int64)
            bad = torch.stack([(ids < 0).any(), (ids >= B).any(), (ids[1:] < ids[:-1]).any()]).tolist()
            if bad[0] or bad[1]:
                raise ValueError(f"seq_ids must lie in [0, B={B}) (B = len(advantages)), got values in "
                                 f"[{int(ids.min())}, {int(ids.max())}]")
            if bad[2]:
                raise ValueError("seq_ids must be non-decreasing (each sequence one run of tokens)")
        lengths = torch.bincount(seq_ids.to(torch.int64), minlength=B).tolist() if N else [0] * B
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


def valid_mask(targets: torch.Tensor, mask, ignore_index: int) -> torch.Tensor:
    """(N,) fp32 0/1: ``mask`` (if given) and ``targets != ignore_index``."""
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
                if not ((mask == 0) | (mask == 1)).all():
                    raise ValueError("mask must hold only 0 and 1 (or be bool), got other values")
            else:
                raise TypeError(f"mask must be bool or 0/1 numbers, got {mask.dtype}")
        m = m & mask.to(torch.bool)
    return m.reshape(-1).float()


def check_values(targets, V, mask, advantages, old_logps, lay: Layout) -> None:
    """Value checks at valid positions, with one device sync for all of them."""
    t = targets.reshape(-1)
    valid = mask > 0
    bad_t = (valid & ((t < 0) | (t >= V))).any()
    seq_valid = torch.zeros(lay.B, dtype=torch.bool, device=t.device)
    if lay.N:
        seq_valid.index_fill_(0, lay.seq[valid], True)
    bad_a = (seq_valid & ~torch.isfinite(advantages.float())).any()
    flags = [bad_t, bad_a]
    if old_logps is not None:
        flags.append((valid & ~torch.isfinite(old_logps.reshape(-1).float())).any())
    res = torch.stack(flags).tolist()
    if res[0]:
        vals = t[valid & ((t < 0) | (t >= V))][:5].tolist()
        raise ValueError(f"targets must be in [0, V={V}) at valid positions, got e.g. {vals}")
    if res[1]:
        vals = advantages[seq_valid & ~torch.isfinite(advantages.float())][:5].tolist()
        raise ValueError(f"advantages must be finite for sequences with valid tokens, got e.g. {vals}")
    if len(res) > 2 and res[2]:
        raise ValueError("old_logps must be finite at valid positions, got NaN/inf")


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
