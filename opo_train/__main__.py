"""Command line: ``opo-train [--config FILE] [key=value ...]`` (also ``python -m opo_train``).

No arguments = the toy default (``configs/toy.yaml``). Under ``torchrun`` every rank runs this.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def keys_help() -> str:
    """Every config key with its default and doc, then TRL's names that are accepted."""
    from .config import ALIASES, key_docs
    lines = ["config keys (key=value; defaults of the built-in defaults, before --config):"]
    for key, (default, doc) in key_docs().items():
        lines.append(f"  {key} = {default!r}")
        lines.append(f"      {doc}")
    lines.append("TRL names accepted as aliases: " + ", ".join(
        f"{a} -> {k}" for a, k in ALIASES.items() if k) + ", per_device_train_batch_size -> "
        "prompts_per_step = it x processes x minibatches / group_size")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="opo-train", description="Train a causal LM with OPO (or GRPO/DAPO/GSPO/Dr.GRPO).",
        epilog="Examples:\n  opo-train\n  opo-train --config toy max_steps=3 output_dir=runs/x seed=1\n"
               "  torchrun --nproc_per_node 2 -m opo_train loss=grpo\n"
               "  opo-train --config exp1_qwen3_1p7b_math model=/models/Qwen3-1.7B "
               "train_file=/data/math_l3.jsonl\n"
               "  opo-train task=hf train_file=x.jsonl sft_steps=0 val_every=0 "
               "rewards=[mymod:correct,mymod:fmt] reward_weights=[1.0,0.5] max_steps=100\n\n" + keys_help(),
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
    from .errors import ConfigError, Interrupted, TrainingStopped
    try:
        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            raise _with_machine_problems(e) from None
        from .train import train
        train(cfg)
    except ConfigError as e:  # a bad key, value, file, path, device or missing package
        _say(f"opo-train: error: {_one_line(e)}")
        return 2
    except TrainingStopped as e:
        _say(f"opo-train: stopped: {_one_line(e)}")
        return 1
    except Interrupted as e:
        _say(f"opo-train: interrupted: {_one_line(e)}")
        return 128 + e.signum
    except KeyboardInterrupt:  # before the run had started: nothing to keep
        _say("opo-train: interrupted before training started; nothing was saved")
        return 130
    return 0


def _with_machine_problems(e) -> Exception:
    """A configuration error, plus what the machine checks find on the keys that could be read:
    every problem in one report."""
    from .errors import ConfigError
    cfg = getattr(e, "config", None)
    if cfg is None:
        return e
    from .metrics import quiet_third_party
    from .train import preflight
    try:
        with quiet_third_party():
            preflight(cfg)
    except ConfigError as more:
        return ConfigError.of(list(dict.fromkeys(e.problems + more.problems)))
    except Exception:  # noqa: BLE001 - a consequence of a value already reported
        pass
    return e


def _say(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: say it once
        print(line, file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
