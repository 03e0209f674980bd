"""opo_kernels: fused kernels for Orthogonalized Policy Optimization (OPO).

``fused_opo_loss(hidden, weight, targets, advantages, old_logps, mask, **options)`` computes the
OPO loss straight from the last hidden states and the LM-head weight, one chunk of logits at a
time; ``linear_logprobs`` is the differentiable log-prob primitive every loss here is built on.
The contract (math, API, numerics, bad input) is ``docs/contract.md``.
"""
from .functional import (LOSSES, fused_opo_loss, fused_policy_loss, linear_logprobs, opo_loss,
                         policy_loss)
from .losses import escort_weights, group_advantages
from .modules import FusedOPOLoss, FusedPolicyLoss
from .vocab_parallel import VocabParallel

__all__ = ["fused_opo_loss", "fused_policy_loss", "FusedOPOLoss", "FusedPolicyLoss", "opo_loss",
           "policy_loss", "linear_logprobs", "escort_weights", "group_advantages", "VocabParallel", "LOSSES"]
__version__ = "0.1.0"
