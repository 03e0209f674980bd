"""``nn.Module`` forms of the fused losses: the options live on the module, tensors go to forward."""
from __future__ import annotations

import torch

from . import checks
from .functional import fused_policy_loss
from .options import split_options

# Keyword arguments of fused_policy_loss that are neither tensors of one batch nor options.
_CALL_ARGS = ("ignore_index", "process_group", "vocab_parallel")


def _check_module_options(loss: str, options: dict) -> None:
    """The options given to a module, checked when it is built (as a call would check them)."""
    lo, bo = split_options("FusedPolicyLoss",
                           {k: v for k, v in options.items() if k not in _CALL_ARGS}, loss=loss)
    checks.check_options(lo)
    checks.check_backend_options(bo, bo.backend)
    checks.check_ignore_index(options.get("ignore_index", -100))


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
