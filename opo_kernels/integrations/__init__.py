"""Drop-ins for the trainers people already run.

- :mod:`opo_kernels.integrations.trl`: ``OPOConfig`` / ``OPOTrainer`` (a ``trl.GRPOTrainer`` whose
  loss is opo's fused loss from the last hidden states and the LM-head weight). Needs ``trl>=1.16``.
- :mod:`opo_kernels.integrations.verl`: ``"opo"`` and ``"opo_group_softmax"`` in verl's
  policy-loss registry. Needs ``verl>=0.9.1``.

Both apply the model's own logit transform (soft-capping, scaling: :func:`head_transform`).

Importing this package imports neither trainer; importing a submodule without its trainer (or
with an older one) raises an ``ImportError`` naming the package and the version needed.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import math

__all__ = ["require", "head_transform"]


def require(package: str, min_version: str, extra: str):
    """Import ``package`` and check it is at least ``min_version``; else an ImportError naming both."""
    hint = f'pip install "opo[{extra}]"  (or: pip install "{package}>={min_version}")'
    try:
        mod = importlib.import_module(package)
    except ImportError as e:
        raise ImportError(f"opo_kernels.integrations.{extra} needs {package}>={min_version}, which is "
                          f"not installed or does not import ({e}); {hint}") from e
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        version = getattr(mod, "__version__", None)
    if version is None or _parse(version) < _parse(min_version):
        raise ImportError(f"opo_kernels.integrations.{extra} needs {package}>={min_version}; found "
                          f"{package}=={version}; {hint}")
    return mod


def _parse(v: str) -> tuple:
    """'1.16.0' -> (1, 16, 0); a local or pre-release tail ('+cpu', 'rc1', '.dev0') is dropped."""
    out = []
    for part in v.split("+")[0].split("."):
        num = ""
        for ch in part:
            if not ch.isdigit():
                break
            num += ch
        if not num:
            break
        out.append(int(num))
        if num != part:
            break
    return tuple(out)


# The text-config fields by which a model's forward transforms hidden @ lm_head.weight into its
# logits: multipliers (scale → softcap → the trainer's temperature); True: the forward divides by it.
_HEAD_MULTIPLIERS = (("logit_scale", False), ("lm_head_multiplier", False), ("output_multiplier", False),
                     ("logits_scaling", True))


def head_transform(text_config) -> dict:
    """``{"logit_scale": ..., "softcap": ...}`` for opo's vocabulary pass from a model's text config, so
    that opo's logits are the model's own (``softcap·tanh(scale·z / softcap)``, then ``/ temperature``).
    Raises ValueError naming the model's field when its value is not a finite number > 0."""
    def value(attr):
        v = getattr(text_config, attr, None)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"opo: the model's {attr}={v!r} transforms the logits and opo applies it only "
                             "as a finite number > 0; fix the model config or train this model without opo")
        return float(v)

    scale = 1.0
    for attr, divides in _HEAD_MULTIPLIERS:
        v = value(attr)
        if v is not None:
            scale = scale / v if divides else scale * v
    return {"logit_scale": scale, "softcap": value("final_logit_softcapping")}
