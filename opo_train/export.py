"""Export a training checkpoint (``torch.distributed.checkpoint``) to HF format.

    python -m opo_train.export RUN_DIR_OR_CHECKPOINT [OUT_DIR] [--config CONFIG_YAML]

``RUN_DIR_OR_CHECKPOINT`` is a run's ``output_dir`` (its newest complete checkpoint is used) or a
``checkpoints/step_NNNNNN`` folder; the model is rebuilt from the run's ``config.yaml`` (or
``--config``) in one process on the CPU. ``OUT_DIR`` defaults to ``<checkpoint>/hf_model``. The
result loads with ``AutoModelForCausalLM.from_pretrained`` (tokenizer padding on the left).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace


def export(checkpoint: str | Path, out_dir: str | Path | None = None,
           config: str | Path | None = None) -> Path:
    import torch
    import torch.distributed.checkpoint as dcp

    from . import checkpoint as ckpt
    from .config import load_config
    from .errors import ConfigError
    from .metrics import quiet_third_party
    from .model import Policy, build_hf_model, load_tokenizer, save_hf
    path = Path(checkpoint)
    if (path / "checkpoints").is_dir():
        found = ckpt.latest(path)
        if found is None:
            raise ConfigError(f"export: {str(path)!r} holds no complete checkpoint")
        path = found
    if not (path / "COMPLETE").exists():
        raise ConfigError(f"export: {str(path)!r} is not a complete checkpoint (no COMPLETE marker)")
    cfg_file = Path(config) if config else path.parent.parent / "config.yaml"
    if not cfg_file.exists():
        raise ConfigError(f"export: no run config at {str(cfg_file)!r}; pass --config")
    cfg = load_config(str(cfg_file), ["fsdp=false", "device=cpu", "activation_checkpointing=false",
                                      "resume=false", "overwrite=false", "tensor_parallel_size=1"])
    with quiet_third_party():
        policy = Policy(build_hf_model(cfg, torch.device("cpu")))
        state = {"model": policy.state_dict()}
        dcp.load(state, checkpoint_id=str(path))
        policy.load_state_dict(state["model"], strict=True)
        return save_hf(policy, load_tokenizer(cfg), Path(out_dir) if out_dir else path / "hf_model",
                       SimpleNamespace(is_main=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m opo_train.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a run's output_dir or a checkpoints/step_NNNNNN folder")
    ap.add_argument("out_dir", nargs="?", default=None, help="default: <checkpoint>/hf_model")
    ap.add_argument("--config", default=None, help="the run's config.yaml (default: next to the checkpoints)")
    args = ap.parse_args(argv)
    from .errors import ConfigError
    try:
        out = export(args.checkpoint, args.out_dir, args.config)
    except ConfigError as e:
        print(f"opo-train export: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
