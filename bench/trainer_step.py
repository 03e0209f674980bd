"""The trainer's step with the fused loss head against a materializing one (``loss_impl=naive``).

Runs ``opo_train`` on its toy default with a scaled-up model (``--vocab``, ``--hidden``), once per
loss implementation, in one process, and reports the median training tokens/s over the steps
after the first (from ``metrics.jsonl``) and the peak memory of the whole run: CUDA
``max_memory_allocated`` on a GPU, peak RSS growth on CPU.

    python -m bench.trainer_step --device cuda --out bench/results/trainer.json
    python -m bench.trainer_step --device cpu --steps 3 --vocab 32768     # a CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import torch


def run_one(impl: str, args, out_dir: str) -> dict:
    from opo_train import load_config, train

    overrides = [f"loss_impl={impl}", f"device={args.device}", f"max_steps={args.steps}",
                 "sft_steps=0", "val_every=0", "save_every=0", "export_hf=false", "plot=false",
                 f"max_new_tokens={args.new_tokens}", f"output_dir={out_dir}",
                 f"model_overrides.vocab_size={args.vocab}",
                 f"model_overrides.hidden_size={args.hidden}",
                 f"model_overrides.head_dim={args.hidden // 4}"]
    cfg = load_config("toy", overrides)
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train(cfg)
    rows = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
    tps = [r["train_tokens_per_s"] for r in rows[1:] if r.get("train_tokens_per_s")]
    out = {"loss_impl": impl, "steps": len(rows),
           "train_tokens_per_s_median": statistics.median(tps) if tps else None,
           "train_tokens_per_s": tps, "overrides": overrides}
    if args.device == "cuda":
        out["peak_cuda_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:  # ru_maxrss is KiB on Linux and never decreases: the first run's growth is exact
        out["peak_rss_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                      - rss0) / 1024
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.trainer_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--impls", default="fused,naive")
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args(argv)
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "command": "python -m bench.trainer_step " + " ".join(sys.argv[1:] if argv is None
                                                                     else argv),
               "runs": []}
    for impl in args.impls.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                r = run_one(impl, args, tmp)
            except Exception as e:  # a failure is a result too; the other impl still runs
                r = {"loss_impl": impl, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        results["runs"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k not in ("train_tokens_per_s",
                                                                  "overrides")}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
