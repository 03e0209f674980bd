"""Where the numbers go: console, ``metrics.jsonl``, TensorBoard (when installed), PNG plots.

Only rank 0 writes. On resume the jsonl is cut back to the rows of steps the checkpoint covers,
so a resumed run's file reads like an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

log = logging.getLogger("opo_train")

# metrics.png: one panel per title, the curves a TRL / verl user reads first (a panel whose keys
# were never logged is left out).
PLOT_PANELS = [
    ("reward", ["reward_mean"]), ("accuracy", ["accuracy", "val_accuracy"]),
    ("KL", ["kl", "mismatch_k3"]), ("entropy", ["entropy"]), ("clip fraction", ["clip_frac"]),
    ("grad norm", ["grad_norm"]), ("learning rate", ["lr"]),
    ("rollout / trainer mismatch (max |log ratio|)", ["mismatch_max_abs"]),
    ("completion length", ["completion_len_mean", "completion_len_max"]), ("loss", ["loss"]),
    ("zero-spread groups", ["zero_spread_frac"]), ("|Δ| (policy vs anchor)", ["delta_abs_mean"]),
]

# TensorBoard / wandb tags: grouped by what they describe (anything else under train/).
_GROUPS = (("rollout/", ("reward", "accuracy", "completion_len", "truncated", "groups_kept",
                         "sampling_rounds", "zero_spread", "rollout_", "mismatch", "val_",
                         "prompts_truncated")),
           ("loss/", ("loss", "entropy", "delta", "chi2", "omega", "clip_frac", "kl", "is_",
                      "adv_range", "grad_response_eff")))


def tag(key: str, prefix: str = "") -> str:
    """The grouped name of a metric (``rollout/reward_mean``, ``loss/kl``, ``train/lr``)."""
    if prefix:
        return prefix + key
    for group, starts in _GROUPS:
        if key.startswith(starts):
            return group + key
    return "train/" + key


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLogger:
    def __init__(self, output_dir: str | Path, enabled: bool, resume_step: int | None = None,
                 tensorboard: bool = True, filename: str = "metrics.jsonl", wandb_config: dict | None = None,
                 tag_prefix: str = ""):
        self.enabled = enabled
        self.prefix = tag_prefix
        self.dir = Path(output_dir)
        self.path = self.dir / filename
        self.rows: list[dict] = []
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if wandb_config is not None:
            self.wandb = start_wandb(self.dir, wandb_config)
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            keep = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
            self.rows = [r for r in keep if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # A resumed run drops the events of the steps it replays (no step twice).
                self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=None if resume_step is None
                                        else resume_step + 1)
            except Exception:  # tensorboard not installed
                self.tb = None

    def log(self, row: dict, console: str | None = None) -> None:
        if not self.enabled:
            return
        row = {k: _clean(v) for k, v in row.items()}
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "phase"):
                    self.tb.add_scalar(tag(k, self.prefix), v, row.get("step", 0))
        if self.wandb is not None:
            self.wandb.log({tag(k, self.prefix): v for k, v in row.items()
                            if isinstance(v, (int, float)) and k != "step"}, step=row.get("step", 0))
        if console:
            print(console, file=sys.stdout, flush=True)

    def plot(self, extra_rows: list[dict] | None = None, name: str = "metrics.png") -> Path | None:
        """``PLOT_PANELS`` against step (the warm-start loss first, when given)."""
        if not self.enabled or not self.rows:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log.info("matplotlib not installed: no plot")
            return None
        fig = plot_rows(plt, self.rows, extra_rows)
        out = self.dir / name
        fig.savefig(out, dpi=80)
        plt.close(fig)
        return out

    def log_samples(self, step: int, samples: list[dict], console: bool = True) -> None:
        """A table of sample completions: appended to completions.jsonl, printed, sent to wandb."""
        if not self.enabled or not samples:
            return
        with open(self.dir / "completions.jsonl", "a") as f:
            for s in samples:
                f.write(json.dumps({"step": step, **s}) + "\n")
        if console:
            print(f"samples step {step}:", flush=True)
            for s in samples:
                adv = "-" if s.get("advantage") is None else f"{s['advantage']:+.2f}"
                rw = "none" if s.get("reward") is None else f"{s['reward']:.3f}"
                print(f"  reward {rw:>6}  adv {adv:>6}  {_short(s['prompt'])!r} -> "
                      f"{_short(s['completion'])!r}", flush=True)
        if self.wandb is not None:
            import wandb
            cols = ["step", "prompt", "completion", "reward", "advantage"]
            table = wandb.Table(columns=cols, data=[[step, str(s["prompt"]), str(s["completion"]),
                                                     s.get("reward"), s.get("advantage")] for s in samples])
            self.wandb.log({"completions": table}, step=step)
        if self.tb is not None:
            cells = lambda x: str(x).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            md = "| reward | advantage | prompt | completion |\n|---|---|---|---|\n" + "".join(
                f"| {s.get('reward')} | {s.get('advantage')} | {cells(s['prompt'])} | "
                f"{cells(s['completion'])} |\n" for s in samples)
            self.tb.add_text("rollout/completions", md, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _short(x, n: int = 160) -> str:
    """A prompt or completion on one line: whole up to ``n`` characters, else its start and end."""
    text = " ".join(str(x).split())
    return text if len(text) <= n else f"{text[:n // 2 - 2]} … {text[-(n // 2 - 2):]}"


def plot_rows(plt, rows: list[dict], extra_rows: list[dict] | None = None):
    """The figure of ``metrics.png``: one panel per ``PLOT_PANELS`` entry with data."""
    panels = [(t, [k for k in keys if any(r.get(k) is not None for r in rows)])
              for t, keys in PLOT_PANELS]
    panels = [(t, keys) for t, keys in panels if keys]
    if extra_rows:
        panels.insert(0, ("warm start (SFT) loss", ["sft_loss"]))
    cols = 4
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False,
                             layout="constrained")
    for ax, (title, keys) in zip(axes.flat, panels):
        src = extra_rows if keys == ["sft_loss"] else rows
        for k in keys:
            pts = [(r["step"], r[k]) for r in src if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 40 else None, label=k)
        if len(keys) > 1:
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return fig


def peak_memory_gb(device) -> float:
    """Peak memory of this process: CUDA memory allocated by torch on a GPU, else peak RSS."""
    import torch
    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def start_wandb(out_dir: Path, config: dict):
    """A wandb run (offline when no API key or mode is configured: nothing needs a network)."""
    import os

    import wandb
    if not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"
    return wandb.init(project=config.get("wandb_project") or "opo", name=out_dir.name,
                      dir=str(out_dir), config=config)


def validation_line(row: dict, n: int, max_steps: int) -> str:
    return (f"val  step {row['step']}/{max_steps}: accuracy {row['val_accuracy']:.3f} (share of {n} held-out "
            f"prompts whose greedy answer has reward >= 1), mean reward {row['val_reward']:.3f}")


class quiet_third_party:
    """Silence other libraries' chatter for the duration of a run (FutureWarnings and
    deprecation notes, transformers' info logs and progress bars); restored afterwards."""

    def __enter__(self):
        import warnings
        self._warn = warnings.catch_warnings()
        self._warn.__enter__()
        for cat in (FutureWarning, DeprecationWarning, UserWarning):
            for mod in ("transformers", "torch", "huggingface_hub", "safetensors", "accelerate",
                        "peft", "datasets", "math_verify", "sympy"):
                warnings.filterwarnings("ignore", category=cat, module=mod)
        self._tf = None
        try:
            from transformers.utils import logging as tlog
            self._tf = (tlog, tlog.get_verbosity(), tlog.is_progress_bar_enabled())
            tlog.set_verbosity_error()
            tlog.disable_progress_bar()
        except Exception:  # noqa: BLE001 - transformers missing or changed: nothing to quiet
            self._tf = None
        self._ds = None
        try:
            import datasets
            self._ds = (datasets, datasets.is_progress_bar_enabled(),
                        datasets.logging.get_verbosity())
            datasets.disable_progress_bars()
            datasets.logging.set_verbosity_error()
        except Exception:  # noqa: BLE001 - datasets missing or changed: nothing to quiet
            self._ds = None
        return self

    def __exit__(self, *exc):
        if self._ds is not None:
            datasets, bars, verbosity = self._ds
            datasets.logging.set_verbosity(verbosity)
            if bars:
                datasets.enable_progress_bars()
        if self._tf is not None:
            tlog, verbosity, bars = self._tf
            tlog.set_verbosity(verbosity)
            if bars:
                tlog.enable_progress_bar()
        self._warn.__exit__(*exc)
        return False


def console_line(row: dict, max_steps: int) -> str:
    """One line per step: progress (share of steps, ETA from this run's steps so far), the
    learning rate, rewards and the update's numbers, throughput and peak memory."""
    def f(k, fmt="{:.3f}"):
        v = row.get(k)
        return "-" if v is None else fmt.format(v)
    eta = row.get("eta_s")
    return (f"step {row['step']:>4}/{max_steps} {100 * row['step'] / max_steps:3.0f}%"
            f"  ETA {'-' if eta is None else _duration(eta)}  lr {f('lr', '{:.2e}')}"
            f"  reward {f('reward_mean')}  acc {f('accuracy', '{:.2f}')}"
            f"  loss {f('loss', '{:+.4f}')}  |g| {f('grad_norm')}  H {f('entropy')}"
            f"  |Δ| {f('delta_abs_mean', '{:.4f}')}"
            + (f"  KL(roll‖θ) {f('mismatch_k3', '{:.1e}')}" if row.get("mismatch_k3") is not None else "")
            + (f"  KL(ref) {f('kl', '{:.4f}')}" if row.get("kl") is not None else "")
            + (f"  IS w {f('is_weight_mean', '{:.3f}')} cut {f('is_frac_cut', '{:.3f}')}"
               if row.get("is_weight_mean") is not None else "")
            + (f"  clip {f('clip_frac', '{:.3f}')}" if row.get("clip_frac") is not None else "")
            + f"  0-spread {f('zero_spread_frac', '{:.2f}')}"
            + f"  len {f('completion_len_mean', '{:.1f}')}"
            f"  {f('train_tokens_per_s', '{:.0f}')} tok/s  mem {f('peak_mem_gb', '{:.2f}')} GB"
            f"  t {f('elapsed', '{:.0f}')}s")
