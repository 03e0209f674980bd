"""Command line: ``opo-train [--config FILE] [key=value ...]`` (also ``python -m opo_train``).

No arguments = the toy default (``configs/toy.yaml``). Under ``torchrun`` every rank runs this.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="opo-train", description="Train a causal LM with OPO (or GRPO/DAPO/GSPO/Dr.GRPO).",
        epilog="Examples:\n  opo-train\n  opo-train --config toy max_steps=3 output_dir=runs/x seed=1\n"
               "  torchrun --nproc_per_node 2 -m opo_train loss=grpo\n"
               "  opo-train --config exp1_qwen3_1p7b_math model=/models/Qwen3-1.7B "
               "train_file=/data/math_l3.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="YAML file or shipped config name (default: toy)")
    parser.add_argument("--list-configs", action="store_true", help="print the shipped configs")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of config keys")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("OPO_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    from .config import CONFIG_DIR, load_config
    if args.list_configs:
        for p in sorted(CONFIG_DIR.glob("*.yaml")):
            print(p.stem)
        return 0
    from .errors import ConfigError, TrainingStopped
    try:
        cfg = load_config(args.config, args.overrides)
        from .train import train
        train(cfg)
    except ConfigError as e:  # a bad key, value, file, path, device or missing package
        _say(f"opo-train: error: {_one_line(e)}")
        return 2
    except TrainingStopped as e:
        _say(f"opo-train: stopped: {_one_line(e)}")
        return 1
    return 0


def _say(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: say it once
        print(line, file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
