"""``python -m bench.accum_drift``: does summing the per-chunk weight-gradient products of a bf16
LM head in bf16 make a short RL run drift (entropy lower, as TRL reports), where summing them in
fp32 and rounding once does not?

The task. ``P`` prompts of ``T`` positions, each position a trainable hidden state (P, T, H) in
front of an LM head (V, H), initialised as the benchmark's peaked inputs (mean token entropy
~1.5 nats, :func:`bench.cases.make_inputs`). Each step samples ``G`` completions per prompt from
the model's own softmax (Gumbel-max with noise shared by every run, so the runs see the same
draws while their policies agree), rewards a completion by the fraction of its tokens in a fixed
"good" set per position (the 2nd to 6th most likely tokens of the initial model: the policy must
move mass off its top token), takes group-relative advantages and ``--epochs`` OPO steps on
the batch (paper mode: the first on-policy, Δ = 0; the later ones against the log-probs it was
sampled with, so the loss is not 0) with Adam on fp32 master weights.

Three runs, the same seeds and draws:

* ``fp32`` — the reference: fp32 model, fp32 gradients;
* ``bf16 / fp32 sum`` — bf16 model (weights rounded from the fp32 master each step); dz rounded
  to bf16 as the GEMMs read it; the weight gradient the sum of the ``--chunks`` per-chunk
  products ``dzᵀ h`` in fp32, rounded to bf16 once (what the chunked backends do);
* ``bf16 / bf16 sum`` — the same, each chunk's product rounded to bf16 and added in bf16.

The hidden-state gradient is the same bf16 GEMM in both bf16 runs, so they differ only in how the
weight gradient's chunks are summed. Reported per step: mean token entropy over the P·T
positions, loss, mean reward, and the distance of the head weight from the reference run's,
relative to how far the reference moved from the start. Writes ``<out>.json`` and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from .cases import Shape, make_inputs

RUNS = ("fp32", "bf16 / fp32 sum", "bf16 / bf16 sum")


def _good_tokens(z: torch.Tensor, lo: int = 1, hi: int = 6) -> torch.Tensor:
    """(rows, V) bool: the tokens ranked lo..hi−1 (0 = most likely) under logits ``z``."""
    top = z.topk(hi, dim=-1).indices[:, lo:]
    return torch.zeros_like(z, dtype=torch.bool).scatter_(1, top, True)


def _step(run: str, master_h, master_w, opt, good, gumbel, P, G, T, chunks, epochs):
    """One batch of ``run``: sample, reward, then ``epochs`` OPO steps on it (the first on-policy,
    Δ = 0; the later ones against the log-probs it was sampled with). Returns (entropy at
    sampling, mean loss over the epochs, reward)."""
    from opo_kernels import group_advantages, opo_loss
    H = master_h.shape[-1]
    lowp = run != "fp32"
    dt = torch.bfloat16 if lowp else torch.float32
    old = None
    losses = []
    for epoch in range(epochs):
        h, w = master_h.detach().to(dt), master_w.detach().to(dt)
        hf, wf = h.float(), w.float()      # bf16-exact values; the GEMMs accumulate in fp32
        z = (hf.reshape(P * T, H) @ wf.T).view(P, 1, T, -1)
        logq = torch.log_softmax(z, -1)
        if epoch == 0:
            ent = -(logq.exp() * logq).sum(-1).mean().item()
            # G completions per prompt: Gumbel-max with the noise every run shares
            tok = (logq + gumbel).argmax(-1)                                  # (P, G, T)
            reward = good.expand(-1, G, -1, -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1).float().mean(-1)
            adv = group_advantages(reward.reshape(-1), G)
            onehot = torch.zeros(P, G, T, z.shape[-1]).scatter_(-1, tok.unsqueeze(-1), 1.0)
        lp = logq.expand(-1, G, -1, -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)     # (P, G, T)
        x = lp.reshape(P * G, T).detach().requires_grad_(True)
        loss, _ = opo_loss(x, old, adv)
        (g,) = torch.autograd.grad(loss, x)
        if epoch == 0:
            old = x.detach()
        losses.append(loss.item())
        # d(loss)/d(logits) of every completion's rows, then the head's two products
        dz = (g.view(P, G, T, 1) * (onehot - logq.exp())).reshape(P * G * T, -1)
        h_rows = hf.unsqueeze(1).expand(P, G, T, H).reshape(-1, H)
        if not lowp:
            dw = dz.T @ h_rows
            dh = (dz @ wf).view(P, G, T, H).sum(1)
        else:
            dzb = dz.to(torch.bfloat16).float()                   # what the GEMMs read
            dh = (dzb @ wf).to(torch.bfloat16).float().view(P, G, T, H).sum(1).to(torch.bfloat16).float()
            acc32 = torch.zeros_like(wf)
            acc16 = torch.zeros_like(w)
            for rows in torch.arange(h_rows.shape[0]).chunk(chunks):
                prod = dzb[rows].T @ h_rows[rows]                 # fp32 product of bf16 inputs
                if run == "bf16 / fp32 sum":
                    acc32 += prod
                else:
                    acc16 += prod.to(torch.bfloat16)
            dw = (acc32.to(torch.bfloat16) if run == "bf16 / fp32 sum" else acc16).float()
        master_h.grad, master_w.grad = dh, dw
        opt.step()
    return ent, sum(losses) / len(losses), reward.mean().item()


def run_all(P: int, G: int, T: int, H: int, V: int, steps: int, chunks: int, lr: float,
            seeds: list[int], epochs: int = 2) -> dict:
    """Every run for every seed: {"seeds": {seed: {run: {entropy, loss, reward, w_dist}}}}."""
    out = {"seeds": {}}
    for seed in seeds:
        x = make_inputs(Shape(P, T, H, V, "float32"), "peaked", "cpu", seed)
        h0, w0 = x.hidden.detach().clone(), x.weight.detach().clone()
        good = _good_tokens(h0.reshape(P * T, H) @ w0.T).view(P, 1, T, V)
        state = {}
        for run in RUNS:
            mh = h0.clone().requires_grad_(True)
            mw = w0.clone().requires_grad_(True)
            state[run] = (mh, mw, torch.optim.Adam([mh, mw], lr=lr))
        traj = {run: {"entropy": [], "loss": [], "reward": [], "w_dist": [], "w_dist_fp32sum": []}
                for run in RUNS}
        g = torch.Generator().manual_seed(1000 + seed)
        for _ in range(steps):
            u = torch.rand(P, G, T, V, generator=g).clamp_(1e-20, 1.0)
            gumbel = -torch.log(-torch.log(u))
            for run in RUNS:
                mh, mw, opt = state[run]
                e, l, r = _step(run, mh, mw, opt, good, gumbel, P, G, T, chunks, epochs)
                traj[run]["entropy"].append(e)
                traj[run]["loss"].append(l)
                traj[run]["reward"].append(r)
            w_ref = state["fp32"][1].detach()
            w_sum32 = state["bf16 / fp32 sum"][1].detach()
            moved = (w_ref - w0).norm().item()
            for run in RUNS:
                w = state[run][1].detach()
                for key, other in (("w_dist", w_ref), ("w_dist_fp32sum", w_sum32)):
                    traj[run][key].append((w - other).norm().item() / moved if moved > 0 else 0.0)
        out["seeds"][str(seed)] = traj
    return out


def summarize(res: dict, window: int) -> dict:
    """Per run: the mean over the last ``window`` steps of each quantity, per seed and averaged;
    and, per seed, the bf16-sum run's final entropy minus the fp32-sum run's."""
    summ = {}
    for run in RUNS:
        per_seed = {}
        for seed, traj in res["seeds"].items():
            per_seed[seed] = {k: sum(v[-window:]) / len(v[-window:]) for k, v in traj[run].items()}
        avg = {k: sum(s[k] for s in per_seed.values()) / len(per_seed) for k in per_seed[next(iter(per_seed))]}
        summ[run] = {"per_seed": per_seed, "mean": avg}
    d = {seed: summ["bf16 / bf16 sum"]["per_seed"][seed]["entropy"] - summ["bf16 / fp32 sum"]["per_seed"][seed]["entropy"]
         for seed in res["seeds"]}
    d_ref = {seed: summ["bf16 / fp32 sum"]["per_seed"][seed]["entropy"] - summ["fp32"]["per_seed"][seed]["entropy"]
             for seed in res["seeds"]}
    return {"runs": summ, "entropy_bf16sum_minus_fp32sum": d, "entropy_fp32sum_minus_fp32": d_ref}


def _md(meta: dict, res: dict, summ: dict) -> str:
    a = meta["args"]
    lines = [f"# bf16 weight-gradient accumulation: drift of a short OPO run (CPU)", "",
             f"`{meta['command']}` — {meta['date']}, torch {meta['torch']}, {meta['threads']} thread(s), "
             f"{meta['seconds']:.0f} s ({meta['cpu_seconds']:.0f} s CPU).", "",
             f"P = {a['p']} prompts × G = {a['g']} completions × T = {a['t']} tokens "
             f"(N = {a['p'] * a['g'] * a['t']} tokens per step, in {a['chunks']} chunks), H = {a['h']}, "
             f"V = {a['v']}, peaked initial inputs, paper-mode OPO, {a['epochs']} Adam steps (lr {a['lr']}) "
             f"per sampled batch, "
             f"{a['steps']} batches, seeds {a['seeds']}. Means over the last {a['window']} batches (entropy "
             "and reward at sampling, loss averaged over the batch's steps):", "",
             "| run | entropy (nats) | loss | reward | ‖W − W_fp32‖ / ‖W_fp32 − W₀‖ "
             "| ‖W − W_bf16/fp32 sum‖ / ‖W_fp32 − W₀‖ |", "|---|---|---|---|---|---|"]
    for run in RUNS:
        m = summ["runs"][run]["mean"]
        lines.append(f"| {run} | {m['entropy']:.4f} | {m['loss']:.4g} | {m['reward']:.4f} | "
                     f"{m['w_dist']:.3e} | {m['w_dist_fp32sum']:.3e} |")
    first = next(iter(res["seeds"].values()))
    lines += ["", f"Initial mean entropy {first['fp32']['entropy'][0]:.4f} nats, reward "
              f"{first['fp32']['reward'][0]:.4f} (seed {next(iter(res['seeds']))}).", "",
              "Final-window entropy, per seed: bf16 sum − fp32 sum (the effect of summing in bf16), and "
              "fp32 sum − fp32 reference (the bf16 model itself):", "",
              "| seed | bf16 sum − fp32 sum | fp32 sum − fp32 |", "|---|---|---|"]
    for seed in res["seeds"]:
        lines.append(f"| {seed} | {summ['entropy_bf16sum_minus_fp32sum'][seed]:+.4e} | "
                     f"{summ['entropy_fp32sum_minus_fp32'][seed]:+.4e} |")
    d, d_ref = summ["entropy_bf16sum_minus_fp32sum"].values(), summ["entropy_fp32sum_minus_fp32"].values()
    lines += ["", f"bf16 sum − fp32 sum: mean {sum(d) / len(d):+.4f} nats (from {min(d):+.4f} to "
              f"{max(d):+.4f}); fp32 sum − fp32: mean {sum(d_ref) / len(d_ref):+.4f} (from "
              f"{min(d_ref):+.4f} to {max(d_ref):+.4f})."]
    step_marks = sorted({0, *range(0, a["steps"], max(1, a["steps"] // 8)), a["steps"] - 1})
    lines += ["", "Entropy trajectory (mean over seeds):", "",
              "| step | " + " | ".join(RUNS) + " |", "|---" * (len(RUNS) + 1) + "|"]
    for s in step_marks:
        vals = [sum(t[run]["entropy"][s] for t in res["seeds"].values()) / len(res["seeds"]) for run in RUNS]
        lines.append(f"| {s} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
    lines += ["", "Loss trajectory (mean over seeds):", "",
              "| step | " + " | ".join(RUNS) + " |", "|---" * (len(RUNS) + 1) + "|"]
    for s in step_marks:
        vals = [sum(t[run]["loss"][s] for t in res["seeds"].values()) / len(res["seeds"]) for run in RUNS]
        lines.append(f"| {s} | " + " | ".join(f"{v:.4g}" for v in vals) + " |")
    lines += ["", "Head-weight distance between runs (mean over seeds), relative to ‖W_fp32 − W₀‖: once "
              "a sampled token differs the runs see different batches and part:", "",
              "| step | bf16/fp32 sum vs fp32 | bf16/bf16 sum vs fp32 | bf16/bf16 sum vs bf16/fp32 sum |",
              "|---|---|---|---|"]
    for s in step_marks:
        def dist(run, key):
            return sum(t[run][key][s] for t in res["seeds"].values()) / len(res["seeds"])
        lines.append(f"| {s} | {dist('bf16 / fp32 sum', 'w_dist'):.3e} | {dist('bf16 / bf16 sum', 'w_dist'):.3e} | "
                     f"{dist('bf16 / bf16 sum', 'w_dist_fp32sum'):.3e} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.accum_drift", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--p", type=int, default=8, help="prompts")
    ap.add_argument("--g", type=int, default=4, help="completions per prompt")
    ap.add_argument("--t", type=int, default=16, help="tokens per completion")
    ap.add_argument("--h", type=int, default=128)
    ap.add_argument("--v", type=int, default=4096)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200, help="sampled batches")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--epochs", type=int, default=2, help="optimizer steps per sampled batch")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--window", type=int, default=20, help="batches averaged at the end")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (1: at these shapes more threads only wait on each other)")
    ap.add_argument("--out", default=None, help="path stem: writes <out>.json and <out>.md")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",") if s != ""]
    torch.set_num_threads(a.threads)
    a.window = max(1, min(a.window, a.steps))
    t0, c0 = time.time(), time.process_time()
    res = run_all(a.p, a.g, a.t, a.h, a.v, a.steps, a.chunks, a.lr, seeds, a.epochs)
    meta = {"command": "python -m bench.accum_drift " + shlex.join(sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "seconds": time.time() - t0, "cpu_seconds": time.process_time() - c0, "args": {**vars(a), "seeds": seeds}}
    summ = summarize(res, a.window)
    md = _md(meta, res, summ)
    print(md)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summ, "trajectories": res},
                                                       indent=1))
        out.with_suffix(".md").write_text(md)
    return meta, res, summ


if __name__ == "__main__":
    main()
