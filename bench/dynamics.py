"""The paper's Figs. 5-8 in miniature: OPO, GRPO, GSPO and DAPO on the trainer's toy task.

``python -m bench.dynamics [--steps N] [--seeds 0,1] [--out DIR] [--set key=value ...]``

Trains the trainer's toy default (``python -m opo_train``: a tiny Qwen3 learning to reverse
digit strings on CPU) once per loss and seed, with the same seeds, budget and every other setting,
then reads each run's ``metrics.jsonl`` and plots reward, gradient norm, policy entropy and the
gradient response efficiency ``|grad| / (AdvRange / 2)`` (paper Fig. 7b) per step. Writes
``DIR/dynamics.png``, ``DIR/summary.json`` and ``DIR/READING.md`` (a short reading of what the
curves show, with the caveats of a toy); the runs themselves go to ``--runs-dir``.
``--plot-only`` re-reads existing runs.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

LOSSES = ("opo", "grpo", "gspo", "dapo")
METRICS = (("reward_mean", "reward (mean over samples)"), ("grad_norm", "gradient norm"),
           ("entropy", "policy entropy (nats/token)"),
           ("grad_response_eff", "gradient response efficiency |g| / (AdvRange/2)"))
COLORS = {"opo": "tab:red", "grpo": "tab:green", "gspo": "tab:blue", "dapo": "tab:orange"}


def run_dir(runs: Path, loss: str, seed: int) -> Path:
    return runs / f"{loss}-seed{seed}"


def _run(cmd: list[str], d: Path, timeout: float):
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "train.log", "w") as logf:
        try:
            rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    dt = time.time() - t0
    print(f"  -> rc {rc} in {dt:.0f}s", flush=True)
    return dt, rc


def warm_start(runs: Path, seed: int, extra: list[str], timeout: float):
    """The toy's supervised warm start, once per seed, exported as an HF model.

    It is the same for every loss (it does not depend on the loss), so the RL runs start from
    this one export instead of each repeating it. The trainer needs at least one RL step to
    finish a run; that step runs at a learning rate of 1e-12, i.e. changes nothing.
    Returns (model dir or None, seconds, return code)."""
    d = runs / f"warm-seed{seed}"
    model = d / "hf_model"
    if (model / "config.json").exists():
        print(f"reusing warm start {model}", flush=True)
        return model, 0.0, 0
    cmd = [sys.executable, "-m", "opo_train", "loss=opo", f"seed={seed}", "max_steps=1",
           "lr=1e-12", f"output_dir={d}", "overwrite=true", "save_every=0", "val_every=0",
           *extra]
    dt, rc = _run(cmd, d, timeout)
    return (model if (model / "config.json").exists() else None), dt, rc


def train_one(runs: Path, loss: str, seed: int, steps: int, extra: list[str], timeout: float,
              model: Path | None = None):
    """One ``python -m opo_train`` run (from ``model`` without a warm start when given);
    returns (seconds, return code)."""
    d = run_dir(runs, loss, seed)
    start = [f"model={model}", "sft_steps=0"] if model is not None else []
    cmd = [sys.executable, "-m", "opo_train", f"loss={loss}", f"seed={seed}",
           f"max_steps={steps}", f"output_dir={d}", "overwrite=true", "save_every=0", *extra,
           *start]
    return _run(cmd, d, timeout)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if r.get("phase", "rl") != "sft" and "step" in r]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _tail_median(vals: list[float], frac: float = 0.25) -> float | None:
    """Median of the last quarter of a series (medians: single-step gradient spikes of 10-20x
    would otherwise decide a mean)."""
    if not vals:
        return None
    k = max(1, int(len(vals) * frac))
    return statistics.median(vals[-k:])


def summarize(runs: dict) -> dict:
    """Per loss and metric: mean over seeds of the last quarter's median (and of the first
    quarter's), and the seed spread of the former."""
    out = {}
    for loss, per_seed in runs.items():
        out[loss] = {}
        for key in [k for k, _ in METRICS] + ["completion_len_mean"]:
            tails = [t for t in (_tail_median(series(rows, key)[1]) for rows in per_seed.values())
                     if t is not None]
            first = [series(rows, key)[1][:max(1, len(rows) // 4)] for rows in per_seed.values()]
            heads = [statistics.median(f) for f in first if f]
            out[loss][key] = {
                "last_quarter": statistics.fmean(tails) if tails else None,
                "seed_min": min(tails) if tails else None,
                "seed_max": max(tails) if tails else None,
                "first_quarter": statistics.fmean(heads) if heads else None,
                "n_seeds": len(tails),
            }
        out[loss]["steps"] = max((len(r) for r in per_seed.values()), default=0)
    return out


def plot(runs: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    for ax, (key, label) in zip(axes.flat, METRICS):
        for loss, per_seed in runs.items():
            for i, (seed, rows) in enumerate(sorted(per_seed.items())):
                x, y = series(rows, key)
                if x:
                    ax.plot(x, y, color=COLORS.get(loss), alpha=0.85 if i == 0 else 0.45,
                            lw=1.4, label=loss.upper() if i == 0 else None)
        ax.set_title(label)
        ax.set_xlabel("RL step")
        if key in ("grad_norm", "grad_response_eff"):
            ax.set_yscale("log")  # single-step spikes of 10-20x would flatten the rest
        ax.grid(True, alpha=0.3)
    axes[0, 0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reading(summary: dict, meta: dict) -> str:
    """A short account of the numbers: what they show on this toy, and what they cannot."""
    def v(loss, key, field="last_quarter"):
        return summary.get(loss, {}).get(key, {}).get(field)

    def fmt(x):
        return "n/a" if x is None else f"{x:.3g}"

    lines = ["# Training dynamics in miniature (toy task)", "",
             f"Command: `{meta['command']}`  ", f"Budget: {meta['budget']}  ",
             f"Seeds: {meta['seeds']}; wall time {meta.get('wall_s', 0):.0f} s on {meta['host']}.",
             "", "Median over each run's last quarter of steps (first quarter in brackets), "
             "averaged over seeds; after the slash, the range of the last-quarter medians over "
             "seeds:", "",
             "| loss | reward | grad norm | entropy | grad response eff. | completion length |",
             "|---|---|---|---|---|---|"]
    for loss in summary:
        cells = []
        for key in [k for k, _ in METRICS] + ["completion_len_mean"]:
            s = summary[loss][key]
            rng = "" if s["n_seeds"] < 2 else f" / {fmt(s['seed_min'])}-{fmt(s['seed_max'])}"
            cells.append(f"{fmt(s['last_quarter'])} [{fmt(s['first_quarter'])}]{rng}")
        lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    lines.append("")
    present = [l for l in LOSSES if v(l, "reward_mean") is not None]
    if present:
        best = max(present, key=lambda l: v(l, "reward_mean"))
        lines.append(f"- Highest final reward: **{best}** ({fmt(v(best, 'reward_mean'))}).")
        change = {l: v(l, "reward_mean") - v(l, "reward_mean", "first_quarter") for l in present}
        lines.append("- Reward change, first quarter to last: " + ", ".join(
            f"{l} {d:+.3f}" for l, d in change.items()) + "." + (
            " With changes this small, no policy reached the high-confidence regime that the "
            "paper's saturation argument is about." if max(change.values()) < 0.1 else ""))

        def overlap(a, b, key):
            sa, sb = summary[a][key], summary[b][key]
            if sa["n_seeds"] < 2 or sb["n_seeds"] < 2:
                return "one seed each, so no error bar"
            sep = sa["seed_min"] > sb["seed_max"] or sb["seed_min"] > sa["seed_max"]
            return "seed ranges do not overlap" if sep else "seed ranges overlap"
        if "opo" in present:
            for key, name in (("reward_mean", "reward"), ("grad_norm", "gradient norm"),
                              ("grad_response_eff", "gradient response efficiency")):
                for other in (l for l in present if l != "opo"):
                    a, b = v("opo", key), v(other, key)
                    if a is not None and b:
                        lines.append(f"- OPO / {other.upper()} {name}: {a / b:.2f}x "
                                     f"({overlap('opo', other, key)}).")
            ent = {l: v(l, "entropy") for l in present if v(l, "entropy") is not None}
            if ent:
                order = sorted(ent, key=ent.get, reverse=True)
                lines.append("- Final entropy, high to low: " +
                             ", ".join(f"{l} {ent[l]:.3g}" for l in order) + ".")
    lines += ["", "What this does and does not show:", "",
              "- It is the trainer's tiny Qwen3 (under 2M parameters) on the toy digit task, a few "
              "hundred RL steps on CPU after a supervised warm start; the paper's Figs. 5-8 "
              "are Qwen3-1.7B on MATH for hundreds of steps. Agreement or disagreement here is "
              "weak evidence either way.",
              "- Gradient norms of different losses are not on one scale: OPO's gradient is that "
              "of -omega*Delta + mu/2*Delta^2 with z-scored weights, the clipped losses' that of "
              "-A*r. A larger norm is not by itself a better update; the trainer clips it at "
              "grad_clip (see config) before the step.",
              "- With on-policy anchors Delta = 0 on the first mini-batch of each rollout batch, "
              "so OPO's chi^2 term acts only from the second one on (the toy runs 2 "
              "mini-batches), where |Delta| is small: the restoring force the paper credits for "
              "non-saturation barely acts at this budget.",
              "- Few seeds: differences inside the seed range are noise."]
    if "dapo" in summary:
        lines.append(
            "- DAPO runs with the trainer's soft overlong punishment (overlong_buffer = "
            "max_new_tokens // 4 by default): on the toy's very short completions the penalty "
            "window covers answers that are correct, so DAPO is pushed towards shorter "
            "completions (see the length column) and its reward (logged without the shaping) "
            "suffers. That is an artifact of the toy's settings, not a finding about DAPO.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.dynamics", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/dynamics",
                    help="where the plot, summary.json and READING.md go")
    ap.add_argument("--runs-dir", default="runs/bench-dynamics",
                    help="the training runs (checkpoints, metrics.jsonl); kept out of --out")
    ap.add_argument("--steps", type=int, default=60, help="RL steps per run (the toy default is 300)")
    ap.add_argument("--seeds", default="0", help="comma list of seeds (same for every loss)")
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra opo_train config overrides for every run (e.g. sft_steps=100)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    ap.add_argument("--plot-only", action="store_true", help="only read existing runs and plot")
    ap.add_argument("--no-shared-warm-start", dest="shared_warm_start", action="store_false",
                    help="let every run do the toy's own supervised warm start (slower; the "
                         "warm start does not depend on the loss)")
    args = ap.parse_args(argv)
    out, runs_dir = Path(args.out), Path(args.runs_dir)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    losses = [l.strip() for l in args.losses.split(",") if l.strip()]
    bad = [l for l in losses if l not in LOSSES + ("dr_grpo",)]
    if bad:
        raise SystemExit(f"--losses: unknown {bad}")
    t0 = time.time()
    status = {}
    if not args.plot_only:
        for seed in seeds:  # seed-major: a cut-short job still has every loss for seed 0
            model = None
            if args.shared_warm_start:
                model, dt, rc = warm_start(runs_dir, seed, args.set, args.timeout)
                status[f"warm-seed{seed}"] = (dt, rc)
                if model is None:
                    raise SystemExit(f"warm start failed (rc {rc}): see "
                                     f"{runs_dir / f'warm-seed{seed}' / 'train.log'}")
            for loss in losses:
                status[f"{loss}-seed{seed}"] = train_one(runs_dir, loss, seed, args.steps, args.set,
                                                         args.timeout, model)
    runs = {loss: {seed: read_rows(run_dir(runs_dir, loss, seed) / "metrics.jsonl")
                   for seed in seeds}
            for loss in losses}
    runs = {l: {s: r for s, r in per.items() if r} for l, per in runs.items()}
    runs = {l: per for l, per in runs.items() if per}
    if not runs:
        raise SystemExit(f"no metrics.jsonl found under {runs_dir}; see the train.log files")
    import platform
    cli = sys.argv[1:] if argv is None else argv
    meta = {"command": "python -m bench.dynamics " + " ".join(cli),
            "budget": f"{args.steps} RL steps per run, toy config" +
                      (f" with {' '.join(args.set)}" if args.set else "") +
                      ("; one shared supervised warm start per seed" if args.shared_warm_start
                       else ""),
            "seeds": seeds, "wall_s": time.time() - t0, "host": platform.node() or "this host",
            "runs": {k: {"seconds": s, "rc": rc} for k, (s, rc) in status.items()}}
    old = out / "summary.json"
    if args.plot_only and old.exists():  # keep the account of the runs that made the data
        prev = json.loads(old.read_text()).get("meta", {})
        meta.update({k: prev[k] for k in ("command", "budget", "wall_s", "runs") if k in prev})
    summary = summarize(runs)
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, out / "dynamics.png",
         f"Toy task (opo_train default), {args.steps} RL steps, seeds {seeds}: "
         "reward, gradient norm, entropy, gradient response efficiency per step")
    (out / "summary.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=1))
    text = reading(summary, meta)
    (out / "READING.md").write_text(text)
    print(text)
    print(f"wrote {out / 'dynamics.png'}, {out / 'summary.json'}, {out / 'READING.md'}")


if __name__ == "__main__":
    main()
