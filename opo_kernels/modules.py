"""``nn.Module`` forms of the fused losses: the options live on the module, tensors go to forward."""
from __future__ import annotations

import torch

from . import checks
from .checks import LossOptions
from .functional import fused_policy_loss

# Keyword arguments of fused_policy_loss that are neither tensors of one batch nor loss options.
_CALL_OPTIONS = ("temperature", "logit_scale", "softcap", "ignore_index", "process_group", "backend", "chunk_size",
                 "filter_eps", "deterministic", "accum_fp32", "vocab_parallel")


def _check_module_options(loss: str, options: dict) -> None:
    """The options given to a module, checked when it is built (as a call would check them)."""
    unknown = sorted(set(options) - set(checks.OPTION_NAMES) - set(_CALL_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected option(s) {unknown}; the options are "
                        f"{sorted(set(checks.OPTION_NAMES) - {'loss'}) + list(_CALL_OPTIONS)}")
    checks.check_options(LossOptions(loss=loss, **{k: v for k, v in options.items()
                                                   if k in checks.OPTION_NAMES}))
    checks.check_vocab_options(options.get("temperature", 1.0), options.get("ignore_index", -100),
                               options.get("logit_scale", 1.0), options.get("softcap"))
    checks.check_backend_options(options.get("backend", "auto"), options.get("chunk_size"),
                                 options.get("filter_eps"), options.get("deterministic", False),
                                 options.get("accum_fp32", True))


class FusedPolicyLoss(torch.nn.Module):
    """``FusedPolicyLoss(loss="grpo", **options)(hidden, weight, targets, advantages, ...)``.

    Options are those of :func:`opo_kernels.fused_policy_loss`, checked here; keyword arguments
    given to ``forward`` override them for that call (all but ``loss``, fixed at construction).
    Returns ``(loss, metrics)``.
    """

    def __init__(self, loss: str = "opo", **options):
        super().__init__()
        _check_module_options(loss, options)
        self.loss = loss
        self.options = options

    def forward(self, hidden, weight, targets, advantages, old_logps=None, mask=None, **overrides):
        if "loss" in overrides:
            raise TypeError(f"loss is fixed when the module is built (loss={self.loss!r}); build "
                            f"another FusedPolicyLoss(loss={overrides['loss']!r}) instead")
        return fused_policy_loss(hidden, weight, targets, advantages, old_logps, mask,
                                 loss=self.loss, **{**self.options, **overrides})

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"loss={self.loss!r}" + (f", {opts}" if opts else "")


class FusedOPOLoss(FusedPolicyLoss):
    """``FusedOPOLoss(alpha=0.4, mu=1.0, ...)``: the OPO loss as a module."""

    def __init__(self, **options):
        if "loss" in options:
            raise TypeError("FusedOPOLoss takes no 'loss' option (use FusedPolicyLoss)")
        super().__init__("opo", **options)
