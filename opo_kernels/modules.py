"""``nn.Module`` forms of the fused losses: the options live on the module, tensors go to forward."""
from __future__ import annotations

import torch

from .functional import fused_policy_loss


class FusedPolicyLoss(torch.nn.Module):
    """``FusedPolicyLoss(loss="grpo", **options)(hidden, weight, targets, advantages, ...)``.

    Options are those of :func:`opo_kernels.fused_policy_loss`; keyword arguments given to
    ``forward`` override them for that call. Returns ``(loss, metrics)``.
    """

    def __init__(self, loss: str = "opo", **options):
        super().__init__()
        self.loss = loss
        self.options = options

    def forward(self, hidden, weight, targets, advantages, old_logps=None, mask=None, **overrides):
        return fused_policy_loss(hidden, weight, targets, advantages, old_logps, mask,
                                 loss=self.loss, **{**self.options, **overrides})

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"loss={self.loss!r}" + (f", {opts}" if opts else "")


class FusedOPOLoss(FusedPolicyLoss):
    """``FusedOPOLoss(alpha=0.4, mu=1.0, ...)``: the OPO loss (SPEC §2) as a module."""

    def __init__(self, **options):
        if "loss" in options:
            raise TypeError("FusedOPOLoss takes no 'loss' option (use FusedPolicyLoss)")
        super().__init__("opo", **options)
