"""Every validation rule of the package, written once: options, layouts, tensors, values.

The public functions call these checks on entry and nothing below them checks again. Each error
is a ``ValueError`` or ``TypeError`` whose message names the argument and the value or shapes
seen. The option definitions (names, defaults, which loss reads which option) live here too, so a
rule and the thing it rules are in one place. See ``docs/contract.md`` ("Bad input").
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOSSES = ("opo", "grpo", "dapo", "gspo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
ESCORTS = ("paper", "group_softmax")
BACKENDS = ("auto", "triton", "native", "torch", "fused", "reference")
# (eps_low, eps_high) of the clipped baselines.
CLIP_DEFAULTS = {"grpo": (0.2, 0.2), "dapo": (0.2, 0.28), "gspo": (3e-4, 4e-4), "dr_grpo": (0.2, 0.2),
                 "bnpo": (0.2, 0.2), "cispo": (0.2, 5.0), "luspo": (0.2, 0.2)}


@dataclass(frozen=True)
class LossOptions:
    """The options of the policy losses, with their defaults (docs/contract.md, "Options")."""
    loss: str = "opo"
    alpha: float = 0.4
    mu: float = 1.0
    tau: float = 1.0
    level: str = "sequence"
    seq_reduce: str = "mean"
    ratio: str = "log"
    normalize: str = "zscore"
    norm_scope: str = "batch"
    group_size: int | None = None
    ref_correction: bool = False
    max_log_ratio: float | None = None
    escort: str = "paper"
    clip_eps_low: float | None = None
    clip_eps_high: float | None = None
    max_completion_length: int | None = None
    beta_r: float = 0.15
    adaptive_tau: bool = True
    # RL terms: every loss but escort="group_softmax" reads (docs/contract.md, "RL terms")
    beta: float = 0.0
    use_bias_correction_kl: bool = False
    is_correction: str | None = None
    is_clip_max: float | None = 3.0
    is_clip_min: float | None = None
    entropy_coef: float = 0.0
    top_entropy_quantile: float = 1.0
    clip_ratio_c: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    # the clipped losses' ratio: per token, or the sequence's length-averaged one (TRL's
    # importance_sampling_level="sequence"); and the two-sided clip's cap on the ratio (TRL's delta)
    ratio_level: str = "token"
    clip_delta: float | None = None
    # off-policy sequence masking (DeepSeek-V3.2, TRL's off_policy_mask_threshold): a sequence with a
    # negative advantage whose mean log(π_rollout / π_θ) exceeds this takes no part in the policy term
    off_policy_mask_threshold: float | None = None
    # VESPO's gamma weighting φ(w) = e^λ · w^k · e^(−λw) of the sequence ratio w, by advantage sign
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    def clip(self) -> tuple[float, float]:
        lo, hi = CLIP_DEFAULTS[self.loss]
        return (lo if self.clip_eps_low is None else self.clip_eps_low,
                hi if self.clip_eps_high is None else self.clip_eps_high)


OPTION_NAMES = tuple(f.name for f in fields(LossOptions))
_DEFAULTS = LossOptions()

# Which options each loss reads. group_size and max_completion_length describe the batch (the G
# of each prompt group, the longest completion the sampler may produce) rather than the loss, so
# trainers may pass them for every loss; they are still checked wherever given.
_LAYOUT_OPTIONS = {"loss", "group_size", "max_completion_length"}
_PAPER = {"alpha", "mu", "tau", "level", "seq_reduce", "ratio", "normalize", "norm_scope",
          "ref_correction", "max_log_ratio", "escort"}
_GROUP_SOFTMAX = {"alpha", "mu", "tau", "max_log_ratio", "escort", "beta_r", "adaptive_tau"}
_CLIPPED = {"clip_eps_low", "clip_eps_high", "clip_ratio_c", "clip_delta", "ratio_level"}
_TERMS = {"beta", "is_correction", "entropy_coef", "top_entropy_quantile", "off_policy_mask_threshold"}


def _used_options(o: LossOptions) -> set:
    terms = set(_TERMS)
    if o.beta > 0:
        terms.add("use_bias_correction_kl")
    if o.is_correction is not None:
        terms |= {"is_clip_max", "is_clip_min"}
    if o.loss == "opo":
        if o.escort == "group_softmax":
            return _GROUP_SOFTMAX | _LAYOUT_OPTIONS
        used = set(_PAPER)
        if o.level == "token" and not o.ref_correction:
            used = used - {"seq_reduce"}  # token level reduces no sequence (ℓ does, with ref_correction)
        return used | _LAYOUT_OPTIONS | terms
    if o.loss == "cispo":
        return {"clip_eps_high", "ratio_level"} | _LAYOUT_OPTIONS | terms
    if o.loss == "sapo":
        return {"sapo_temperature_pos", "sapo_temperature_neg", "ratio_level"} | _LAYOUT_OPTIONS | terms
    if o.loss == "vespo":  # its own sequence weights: no clip, no rollout IS weights (they enter φ in TRL)
        return ({"vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"} | _LAYOUT_OPTIONS
                | (terms - {"is_correction", "is_clip_max", "is_clip_min"}))
    if o.loss == "gspo":  # the sequence ratio is what gspo is
        return (_CLIPPED - {"ratio_level"}) | _LAYOUT_OPTIONS | terms
    return _CLIPPED | _LAYOUT_OPTIONS | terms


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


def option_kwargs(fn: str, options: dict) -> None:
    """Unknown keyword arguments of ``fn`` raise a TypeError naming them."""
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"{fn}() got unexpected keyword argument(s) {unknown}; the loss options "
                        f"are {list(OPTION_NAMES)}")


def check_options(o: LossOptions) -> None:
    """Each option's value, and that no option the chosen loss does not read was changed."""
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
        check_positive(name, getattr(o, name))
    if o.max_log_ratio is not None:
        check_positive("max_log_ratio", o.max_log_ratio)
    if o.clip_eps_low is not None:
        _number("clip_eps_low", o.clip_eps_low)
        if not 0.0 <= o.clip_eps_low < 1.0:
            raise ValueError(f"clip_eps_low must be in [0, 1) (the ratio's lower bound 1 - eps must "
                             f"stay > 0), got {o.clip_eps_low!r}")
    if o.clip_eps_high is not None:
        _number("clip_eps_high", o.clip_eps_high)
        if not o.clip_eps_high >= 0.0:
            raise ValueError(f"clip_eps_high must be >= 0, got {o.clip_eps_high!r}")
    _flag("ref_correction", o.ref_correction)
    _flag("adaptive_tau", o.adaptive_tau)
    _flag("use_bias_correction_kl", o.use_bias_correction_kl)
    _number("beta", o.beta)
    if o.beta < 0:
        raise ValueError(f"beta must be >= 0, got {o.beta!r}")
    _number("entropy_coef", o.entropy_coef)
    if o.entropy_coef < 0:
        raise ValueError(f"entropy_coef must be >= 0 (the loss subtracts entropy_coef · H), got "
                         f"{o.entropy_coef!r}")
    _number("top_entropy_quantile", o.top_entropy_quantile)
    if not 0.0 <= o.top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {o.top_entropy_quantile!r}")
    if o.is_correction is not None:
        check_choice("is_correction", o.is_correction, IS_MODES + (None,))
    for name in ("is_clip_max", "is_clip_min"):
        if getattr(o, name) is not None:
            check_positive(name, getattr(o, name))
    if o.is_correction is not None:
        if o.is_clip_min is None and o.is_clip_max is None:
            raise ValueError("is_correction needs is_clip_max or is_clip_min (or both), got both None")
        if o.is_clip_min is not None and o.is_clip_max is not None and o.is_clip_min > o.is_clip_max:
            raise ValueError(f"is_clip_min={o.is_clip_min!r} must be <= is_clip_max={o.is_clip_max!r}")
    if o.clip_ratio_c is not None:
        _number("clip_ratio_c", o.clip_ratio_c)
        if not o.clip_ratio_c > 1.0:
            raise ValueError(f"clip_ratio_c (dual clip) must be > 1, got {o.clip_ratio_c!r}")
    for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
        check_positive(name, getattr(o, name))
    check_choice("ratio_level", o.ratio_level, ("token", "sequence"))
    if o.off_policy_mask_threshold is not None:
        _number("off_policy_mask_threshold", o.off_policy_mask_threshold)
    for name in ("vespo_k_pos", "vespo_k_neg"):
        _number(name, getattr(o, name))
        if getattr(o, name) < 0:
            raise ValueError(f"{name} (VESPO's exponent k) must be >= 0, got {getattr(o, name)!r}")
    for name in ("vespo_lambda_pos", "vespo_lambda_neg"):
        check_positive(name, getattr(o, name))
    if o.clip_delta is not None:
        _number("clip_delta", o.clip_delta)
        if not o.clip_delta > 1.0:
            raise ValueError(f"clip_delta (the two-sided clip's cap on the ratio) must be > 1, got {o.clip_delta!r}")
    positive_int("group_size", o.group_size)
    positive_int("max_completion_length", o.max_completion_length)
    used = _used_options(o)
    for name in OPTION_NAMES:
        if name not in used and getattr(o, name) != getattr(_DEFAULTS, name):
            what = f"loss={o.loss!r}" + (f", escort={o.escort!r}" if o.loss == "opo" else "") + \
                (f", level={o.level!r}" if name == "seq_reduce" else "")
            raise ValueError(f"{name}={getattr(o, name)!r} has no effect with {what}: leave it at its "
                             f"default {getattr(_DEFAULTS, name)!r}")
    if o.norm_scope == "group" and o.group_size is None:
        raise ValueError("norm_scope='group' needs group_size (the G of each prompt group), got None")
    if o.escort == "group_softmax":
        if o.group_size is None:
            raise ValueError("escort='group_softmax' needs group_size (the G of each prompt group), "
                             "got None")
        if o.alpha == 0:
            raise ValueError("escort='group_softmax' scales by 1/alpha: alpha must be > 0, got 0")


def check_group_size(group_size, B: int) -> None:
    if group_size is not None and B % group_size:
        raise ValueError(f"group_size must divide the number of sequences B={B}, got "
                         f"group_size={group_size!r}")


def check_vocab_options(temperature, ignore_index, logit_scale=1.0, softcap=None) -> None:
    """The vocabulary-pass options: ``temperature`` and ``logit_scale`` finite > 0, ``softcap``
    None or finite > 0, ``ignore_index`` an int."""
    check_positive("temperature", temperature)
    check_positive("logit_scale", logit_scale)
    if softcap is not None:
        check_positive("softcap", softcap)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")


def check_filter_eps(filter_eps) -> None:
    if filter_eps is None:
        return
    _number("filter_eps", filter_eps)
    if filter_eps < 0:
        raise ValueError(f"filter_eps must be None or a finite number >= 0, got {filter_eps!r}")


def check_backend_options(backend: str, chunk_size, filter_eps, deterministic,
                          accum_fp32=True) -> None:
    """``chunk_size`` goes with the chunked backends, ``filter_eps``, ``deterministic`` and
    ``accum_fp32`` with ``fused``. ``backend`` is the concrete backend ("auto" when it is not known yet: then only
    the values are checked)."""
    check_choice("backend", backend, BACKENDS)
    positive_int("chunk_size", chunk_size)
    check_filter_eps(filter_eps)
    _flag("deterministic", deterministic)
    _flag("accum_fp32", accum_fp32)
    if backend == "auto":
        return
    if chunk_size is not None and backend in ("fused", "reference"):
        raise ValueError(f"chunk_size={chunk_size!r} has no effect with backend={backend!r} (it "
                         "has no logits chunks): leave it None")
    if backend != "fused":
        if filter_eps is not None:
            raise ValueError(f"filter_eps={filter_eps!r} applies to backend='fused' only, got "
                             f"backend={backend!r}")
        if deterministic:
            raise ValueError(f"deterministic=True applies to backend='fused' only (the other "
                             f"backends are deterministic already), got backend={backend!r}")
        if not accum_fp32:
            raise ValueError(f"accum_fp32=False applies to backend='fused' only, got "
                             f"backend={backend!r}")


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


def check_entropy_for_grad(entropy, grad_entropy) -> None:
    if grad_entropy is not None and entropy is None:
        raise ValueError("entropy must be given when grad_entropy is given")


# Log-probs are ≤ 0; fp32 rounding of z_t − logsumexp(z) can leave a confident token's value a
# few ulp of |logits| above 0. 2^-9 is 2 ulp of fp32 at |logits| < 2^13: anything larger is not
# a log-prob (e.g. an NLL passed with the wrong sign).
LOGP_TOL = 2.0 ** -9


def _logp_flags(t, valid):
    """(any non-finite, any > LOGP_TOL) at valid positions of log-probs ``t``, as 0-d bool
    tensors (no device sync)."""
    x = t.detach().reshape(-1).float()
    return (valid & ~torch.isfinite(x)).any(), (valid & (x > LOGP_TOL)).any()


def _raise_positive_logps(name, t, valid):
    x = t.detach().reshape(-1).float()
    vals = x[valid & (x > LOGP_TOL)][:5].tolist()
    raise ValueError(f"{name} must be log-probs (<= 0, up to rounding {LOGP_TOL:g}) at valid "
                     f"positions, got e.g. {vals} (negative log-likelihoods passed as log-probs?)")


def check_logps(logps, mask_valid) -> None:
    """The per-token log-probs of :func:`opo_kernels.policy_loss`: float, (B, T) or (N,), finite
    where valid (``mask_valid`` (N,) bool or None)."""
    if not isinstance(logps, torch.Tensor) or not logps.is_floating_point():
        raise TypeError(f"logps must be a float tensor, got {getattr(logps, 'dtype', type(logps).__name__)}")
    if logps.dim() not in (1, 2):
        raise ValueError(f"logps must be (B, T) or (N,), got {tuple(logps.shape)}")
    if mask_valid is not None:
        bad, pos = torch.stack(_logp_flags(logps, mask_valid)).tolist()
        if bad:
            raise ValueError("logps must be finite at valid positions, got NaN/inf")
        if pos:
            _raise_positive_logps("logps", logps, mask_valid)


def check_rows(name: str, t, n: int, device: torch.device, *, integer: bool = False) -> torch.Tensor:
    """A per-row (n,) vector of a kernel's inputs, returned contiguous."""
    check_tensor(name, t)
    if tuple(t.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the other inputs on {device}")
    if integer and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if not integer and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t.contiguous()


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


def _bad_targets(t, V, valid):
    vals = t[valid & ((t < 0) | (t >= V))][:5].tolist()
    raise ValueError(f"targets must be in [0, V={V}) at valid positions, got e.g. {vals}")


def check_targets(targets, V: int, valid) -> bool:
    """targets (N,) in [0, V) wherever ``valid`` (N,) bool; returns whether any position is not
    valid. One device sync."""
    res = torch.stack([(valid & ((targets < 0) | (targets >= V))).any(), (~valid).any()]).tolist()
    if res[0]:
        _bad_targets(targets, V, valid)
    return bool(res[1])


def check_values(targets, V, mask, advantages, old_logps, lay: Layout) -> bool:
    """Value checks at valid positions, with one device sync for all of them.

    Returns whether any position is masked (the caller then keeps those rows out of the GEMMs).
    """
    t = targets.reshape(-1)
    valid = mask > 0
    bad_t = (valid & ((t < 0) | (t >= V))).any()
    seq_valid = torch.zeros(lay.B, dtype=torch.bool, device=t.device)
    if lay.N:
        seq_valid.index_fill_(0, lay.seq[valid], True)
    bad_a = (seq_valid & ~torch.isfinite(advantages.float())).any()
    flags = [bad_t, bad_a]
    if old_logps is not None:
        flags.extend(_logp_flags(old_logps, valid))
    flags.append((~valid).any())
    res = torch.stack(flags).tolist()
    if res[0]:
        _bad_targets(t, V, valid)
    if res[1]:
        vals = advantages[seq_valid & ~torch.isfinite(advantages.float())][:5].tolist()
        raise ValueError(f"advantages must be finite for sequences with valid tokens, got e.g. {vals}")
    if old_logps is not None and res[2]:
        raise ValueError("old_logps must be finite at valid positions, got NaN/inf")
    if old_logps is not None and res[3]:
        _raise_positive_logps("old_logps", old_logps, valid)
    return bool(res[-1])


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
    bad = ok & ~torch.isfinite(advantages.float())
    if anchor_seq_logps is not None:
        if not isinstance(anchor_seq_logps, torch.Tensor) or _shape(anchor_seq_logps) != (B,):
            raise ValueError(f"anchor_seq_logps must be a (B,) = ({B},) tensor, got "
                             f"{_shape(anchor_seq_logps) if isinstance(anchor_seq_logps, torch.Tensor) else type(anchor_seq_logps).__name__}")
        bad_l = ok & ~torch.isfinite(anchor_seq_logps.float())
        if bool(bad_l.any()):
            raise ValueError(f"anchor_seq_logps must be finite for valid sequences, got e.g. "
                             f"{anchor_seq_logps[bad_l][:5].tolist()}")
    if bool(bad.any()):
        raise ValueError(f"advantages must be finite for valid sequences, got e.g. "
                         f"{advantages[bad][:5].tolist()}")


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


def _count(name, v):
    """A global count (int, float or 0-d tensor) ≥ 0, returned as a float, or None."""
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {_shape(v)}")
        v = float(v.reshape(()).item())
    elif isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number or a one-element tensor, got {type(v).__name__} {v!r}")
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
    return float(v)


_ESCORT_OPTIONS = ("alpha", "tau", "normalize", "norm_scope", "ref_correction")
_TOKEN_MEAN_LOSSES = ("dapo", "bnpo", "cispo", "vespo")


def counts_read(o: LossOptions) -> tuple[bool, bool]:
    """Whether the loss with options ``o`` reads ``(num_items_in_batch, num_seqs_in_batch)``.

    The token count is the denominator of a token mean: the policy term of dapo / bnpo / cispo /
    vespo / token-level OPO (and their KL), or the entropy bonus. The sequence count is that of a
    sequence mean (grpo, sapo, gspo, luspo, sequence-level OPO) or dr_grpo's B. escort="group_softmax"
    reads neither (its weights need whole groups in one call).
    """
    if o.loss == "opo" and o.escort == "group_softmax":
        return False, False
    token_mean = o.loss in _TOKEN_MEAN_LOSSES or (o.loss == "opo" and o.level == "token")
    return token_mean or o.entropy_coef > 0, not token_mean


def check_rl_inputs(o: LossOptions, targets, mask_valid, n_seqs: int, *, omega=None, ref_logps=None,
                    rollout_logps=None, num_items_in_batch=None, num_seqs_in_batch=None):
    """The per-call inputs of the RL terms (docs/contract.md, "RL terms"): shapes, dtypes, devices,
    finite values at valid positions (``mask_valid`` (N,) bool), and what goes with what.
    Returns ``(num_items, num_seqs)`` as floats or None."""
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
        bad, pos = torch.stack(_logp_flags(t, mask_valid)).tolist()
        if bad:
            raise ValueError(f"{name} must be finite at valid positions, got NaN/inf")
        if pos:
            _raise_positive_logps(name, t, mask_valid)
    if o.beta > 0 and ref_logps is None:
        raise ValueError(f"beta={o.beta!r} > 0 needs ref_logps (the reference model's log-probs)")
    if o.is_correction is not None and rollout_logps is None:
        raise ValueError(f"is_correction={o.is_correction!r} needs rollout_logps (the rollout engine's "
                         "log-probs of the sampled tokens)")
    if omega is not None:
        if not (o.loss == "opo" and o.escort == "paper"):
            raise ValueError(f"omega (fixed escort weights) applies to loss='opo', escort='paper' only, "
                             f"got loss={o.loss!r}" + (f", escort={o.escort!r}" if o.loss == "opo" else ""))
        if not isinstance(omega, torch.Tensor) or not omega.is_floating_point():
            raise TypeError(f"omega must be a float tensor or None, got "
                            f"{getattr(omega, 'dtype', type(omega).__name__)}")
        if _shape(omega) != (n_seqs,):
            raise ValueError(f"omega must be (B,) = ({n_seqs},), one weight per sequence, got {_shape(omega)}")
        if omega.device != targets.device:
            raise ValueError(f"omega is on {omega.device}, targets on {targets.device}")
        changed = [n for n in _ESCORT_OPTIONS if getattr(o, n) != getattr(_DEFAULTS, n)]
        if changed:
            raise ValueError(f"omega is given, so the escort options {changed} have no effect (they are "
                             "escort_weights' arguments): leave them at their defaults")
    ni = _count("num_items_in_batch", num_items_in_batch)
    ns = _count("num_seqs_in_batch", num_seqs_in_batch)
    if (ni is not None or ns is not None) and o.loss == "opo" and o.escort == "group_softmax":
        raise ValueError("num_items_in_batch / num_seqs_in_batch do not apply to escort='group_softmax' "
                         "(its weights and adaptive τ need whole groups in one call)")
    reads = counts_read(o)
    for name, v, read in (("num_items_in_batch", ni, reads[0]), ("num_seqs_in_batch", ns, reads[1])):
        if v is not None and not read:
            what = f"loss={o.loss!r}" + (f", level={o.level!r}" if o.loss == "opo" else "") + \
                f", entropy_coef={o.entropy_coef!r}"
            raise ValueError(f"{name}={v!r} has no effect with {what} (no mean of the loss divides "
                             f"by it): leave it None")
    return ni, ns


def check_completion_length(o: LossOptions, mask: torch.Tensor, lengths: torch.Tensor) -> None:
    """dr_grpo divides by ``max_completion_length``: no sequence may have more valid tokens than
    that. mask (N,) fp32 0/1; lengths (B,) int64 tokens per sequence (one device sync)."""
    if o.loss != "dr_grpo" or o.max_completion_length is None or mask.numel() == 0:
        return
    longest = int(torch.segment_reduce(mask, "sum", lengths=lengths, unsafe=True).max())
    if longest > o.max_completion_length:
        raise ValueError(f"max_completion_length={o.max_completion_length!r} is shorter than a "
                         f"sequence of the batch ({longest} valid tokens); dr_grpo divides by "
                         "B · max_completion_length, the longest completion the sampler may produce")


def check_process_group(process_group) -> None:
    """None or a ``torch.distributed.ProcessGroup``."""
    if process_group is None:
        return
    import torch.distributed as dist
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"process_group must be None or a torch.distributed.ProcessGroup, got "
                        f"{type(process_group).__name__} {process_group!r}")


def check_omega_values(omega, seq_valid) -> None:
    """omega finite for sequences with a valid token (``seq_valid`` (B,) bool)."""
    if omega is not None and bool((seq_valid & ~torch.isfinite(omega.float())).any()):
        raise ValueError("omega must be finite for sequences with valid tokens, got NaN/inf")


def check_entropy_tensor(entropy, logps, mask_valid) -> None:
    """The per-token entropies of :func:`opo_kernels.policy_loss`: float, like ``logps``, finite
    where valid."""
    if not isinstance(entropy, torch.Tensor) or not entropy.is_floating_point():
        raise TypeError(f"entropy must be a float tensor or None, got "
                        f"{getattr(entropy, 'dtype', type(entropy).__name__)}")
    if _shape(entropy) != _shape(logps):
        raise ValueError(f"entropy shape {_shape(entropy)} must equal logps shape {_shape(logps)}")
    if bool((mask_valid & ~torch.isfinite(entropy.reshape(-1).float())).any()):
        raise ValueError("entropy must be finite at valid positions, got NaN/inf")
