"""opo_train: a lean FSDP2 trainer for OPO (and GRPO, DAPO, GSPO, Dr. GRPO) on opo_kernels.

Python API::

    from opo_train import load_config, train
    summary = train(load_config("toy", ["max_steps=20"]), reward_fns=my_reward, dataset=my_rows)
"""
from __future__ import annotations

from .config import Config, load_config
from .rewards import math_reward, toy_reward
from .train import train

__all__ = ["Config", "load_config", "train", "toy_reward", "math_reward"]
