"""Drop-ins for the trainers people already run.

- :mod:`opo_kernels.integrations.trl`: ``OPOConfig`` / ``OPOTrainer`` (a ``trl.GRPOTrainer`` whose
  loss is opo's fused loss from the last hidden states and the LM-head weight). Needs ``trl>=1.16``.
- :mod:`opo_kernels.integrations.verl`: ``"opo"`` and ``"opo_group_softmax"`` in verl's
  policy-loss registry. Needs ``verl>=0.9.1``.

Importing this package imports neither trainer; importing a submodule without its trainer (or
with an older one) raises an ``ImportError`` naming the package and the version needed.
"""
from __future__ import annotations

import importlib
import importlib.metadata

__all__ = ["require"]


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
