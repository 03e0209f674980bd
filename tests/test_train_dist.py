"""2-process torchrun (gloo, CPU) vs 1 process on the same data: same losses, gradients, weights.

The file is also the worker: ``torchrun --nproc_per_node N tests/test_train_dist.py OUT``.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opo_train.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]


def _worker(out_path: str) -> None:
    sys.path.insert(0, str(ROOT))
    from opo_train.config import load_config
    from opo_train.distributed import setup, teardown
    from opo_train.model import build_policy
    from opo_train.train import (Seq, anchor_logprobs, collate, grad_norm_and_clip, rank_share,
                                 update_policy)

    # OPO_DIST_OVERRIDES: extra config overrides (tests/test_train_offpolicy.py: the loss terms)
    extra = os.environ.get("OPO_DIST_OVERRIDES", "").split()
    # OPO_DIST_TP: tensor_parallel_size (the loss head's vocabulary split over that many ranks)
    tp = int(os.environ.get("OPO_DIST_TP", "1"))
    cfg = load_config(None, ["prompts_per_step=4", "group_size=4", "minibatches=2", "lr=0.1",
                             "grad_clip=0", "sft_steps=0", "max_steps=1",
                             f"tensor_parallel_size={tp}", *extra])
    info = setup("cpu", cfg.tensor_parallel_size)
    policy = build_policy(cfg, info, seed=0)
    # SGD: the weights move by lr · gradient, so their difference is bounded by the gradients'
    # (Adam's g / (|g| + eps) turns fp32 noise in a near-zero gradient into a step of ~lr). lr
    # 0.1 moves them about as far as Adam at 1e-3, so the second mini-batch's loss is not ~0.
    opt = torch.optim.SGD(policy.parameters(), lr=cfg.lr)
    # Fixed global data: 4 prompt groups x 4 sequences of varied lengths.
    g = torch.Generator().manual_seed(1)
    seqs = []
    for i in range(16):
        p, c = int(torch.randint(3, 7, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        seqs.append(Seq(torch.randint(2, 100, (p + c,), generator=g).tolist(), p,
                        float(torch.randn((), generator=g))))
    share = rank_share(4, 2, info.world, info.rank)
    if os.environ.get("OPO_DIST_REVERSE") == "1":
        # the same mini-batches with their prompt groups in the other order: the same math, every
        # sum over tokens and sequences taken in another fp32 order
        share = [mb[::-1] for mb in share]
    batches = [collate([seqs[gi * 4 + s] for gi in mb for s in range(4)], 0, info.device, False)
               for mb in share]
    anchors = anchor_logprobs(policy, batches, cfg)
    # the largest |log-prob| of a valid token: the scale of the log-probs' fp32 rounding
    logp_max = max(float(torch.where(b["mask"], a, 0.0).abs().max()) for b, a in zip(batches, anchors))
    refs = None
    if extra:  # rollout / reference log-probs: fixed functions of each token, whatever the layout
        for b, old in zip(batches, anchors):
            b["rollout_logps"] = torch.where(b["mask"], old + 0.3 * torch.cos(b["targets"].float()), 0.0)
        refs = [torch.where(b["mask"], old + 0.2 * torch.sin(b["targets"].float()), 0.0)
                for b, old in zip(batches, anchors)]
    grads = []

    before = []  # the weights each step's loss and gradients were computed at

    def hook(epoch, k, pol):
        grads.append({n: p.grad.full_tensor().clone() for n, p in pol.named_parameters()})
        before.append({n: p.detach().full_tensor().clone() for n, p in pol.named_parameters()})

    stats = update_policy(policy, opt, batches, anchors, cfg, info, cfg.lr, grad_hook=hook, refs=refs)
    params = {n: p.detach().full_tensor().clone() for n, p in policy.named_parameters()}
    # grad_norm_and_clip on gradients that are the same in every layout (seeded, global shapes)
    from torch.distributed.tensor import distribute_tensor
    gen = torch.Generator().manual_seed(5)
    for p in policy.parameters():
        p.grad = distribute_tensor(torch.randn(p.shape, generator=gen), p.device_mesh, p.placements)
    clip_norm = grad_norm_and_clip(policy, 1.0)
    clipped = {n: p.grad.full_tensor().clone() for n, p in policy.named_parameters()}
    vp = policy.head.vocab_parallel  # each tensor-parallel rank's rows of the head
    head_split = [None] * info.tp_size
    if vp is not None:
        torch.distributed.all_gather_object(head_split, (vp.start, vp.stop), group=info.tp_group)
    if info.is_main:
        # written whole or not at all: a rank aborted at exit must not leave half a file behind
        tmp = out_path + ".tmp"
        torch.save({"loss": [s["loss"] for s in stats], "grad_norm": [s["grad_norm"] for s in stats],
                    "grads": grads, "params": params, "before": before, "world": info.procs,
                    "lr": cfg.lr, "logp_max": logp_max, "head_split": head_split,
                    "clip_norm": clip_norm, "clipped": clipped}, tmp)
        os.replace(tmp, out_path)
    teardown(info)


# gloo can abort a rank at process exit, after every collective is done: its teardown race ("terminate
# called after throwing gloo::IoException ... Connection closed by peer", or "terminate called
# without an active exception"). torchrun then stops the other rank with SIGTERM and reports the
# abort. Only that exit is tolerated: every failed rank's exit code a SIGABRT (-6) or the launcher's
# SIGTERM (-15); a Python exception in a worker exits with 1 and still fails. The callers then
# check the outputs, which are written (atomically) after the last collective.
_GLOO_TEARDOWN = ("Connection closed by peer", "Connection reset by peer")


def _assert_ran(r) -> None:
    if r.returncode == 0:
        return
    text = r.stdout + r.stderr
    codes = set(re.findall(r"exitcode\s*:\s*(-?\d+)", text))
    teardown = codes and codes <= {"-6", "-15"} and "SIGABRT" in text
    assert teardown or (any(m in text for m in _GLOO_TEARDOWN) and "Traceback" not in text), \
        r.stdout[-3000:] + r.stderr[-3000:]


def _run(nproc: int, out: Path, reverse: bool = False, tp: int = 1):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["OPO_DIST_REVERSE"] = "1" if reverse else "0"
    env["OPO_DIST_TP"] = str(tp)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "--master_addr=127.0.0.1", __file__, str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    _assert_ran(r)
    return torch.load(out, weights_only=False)


# The tolerance, derived in the same run. 1 and 2 processes add the same fp32 terms in different
# orders (per-rank partial sums, then the all-reduce / reduce-scatter). How far two orders of
# these very sums drift apart is measured, not guessed: a second 1-process run takes every
# mini-batch's prompt groups in the other order (``reverse``), which changes the order of every
# sum over tokens and sequences and nothing else. The 2-process result may differ from the
# 1-process one by K times that drift (the max of a difference of two orderings over ~10^5
# entries varies by well under 2x between orderings; K = 4 leaves room), plus a floor of 8 fp32
# ulps of the largest entry (for entries the reordering happened not to move). A real bug is far
# larger: a missing all-reduce leaves each rank half the batch, a wrong scale is a factor such
# as 2; the test asserts that even a 1% error exceeds the bound. The scalars (loss, grad norm)
# and the weights are bounded from the gradients' bound (see assert_processes_match), not from a
# single reordered sample, whose size varies too much from run to run.
K_ORDER = 4.0
EPS32 = 2.0 ** -24


def _bound(drift: float, scale: float) -> float:
    return K_ORDER * drift + 8 * EPS32 * scale


def _max_diff(a: dict, b: dict) -> float:
    return max(float((b[n] - a[n]).abs().max()) for n in a)


def _norm(d: dict) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in d.values())))


def assert_processes_match(one: dict, rev: dict, two: dict) -> None:
    """``two`` (2 processes) equals ``one`` (1 process): every optimizer step's gradients within
    the bound measured by ``rev`` (1 process, other summation order); the weights (SGD) and the
    scalars within what those gradients and weights imply."""
    lr = one["lr"]
    moved = None  # bound on |p_two − p_one| after the previous step, per tensor
    for k, (g1, gr, g2) in enumerate(zip(one["grads"], rev["grads"], two["grads"])):
        assert g1.keys() == g2.keys() == gr.keys()
        w1, w2 = one["before"][k], two["before"][k]
        if moved is not None:  # the weights this step started from: within the previous bound
            for n in w1:
                assert float((w2[n] - w1[n]).abs().max()) <= moved[n], (k, n)
        # The loss of step k is one function of weights that differ by dw = w2 − w1 (measured):
        # first order |Δloss| ≤ Σ |g|·|dw|, doubled for the higher orders; plus the drift of the
        # loss's own sums (the reordered run's) and a few ulps.
        # Rounding: a weight difference of one ulp can move a log-prob's rounding by a whole ulp
        # (≤ 2^-23 · max|logp| apart between runs); the loss is a weighted mean of log-probs
        # with Σ_t |∂L/∂logp_t| ≤ 16 (|ω|, |A| < 4 for z-scored weights of ≤ 16 sequences,
        # times importance weights ≤ 3, plus β·|1 − e^(ref − logp)| < 1).
        l1, lr_, l2 = one["loss"][k], rev["loss"][k], two["loss"][k]
        moved_any = any(bool((w2[n] != w1[n]).any()) for n in w1)
        b_loss = 2 * sum(float((g1[n].abs() * (w2[n] - w1[n]).abs()).sum()) for n in g1) + \
            K_ORDER * abs(lr_ - l1) + 8 * EPS32 * abs(l1) + \
            (16 * 2 * EPS32 * 2 * max(one["logp_max"], two["logp_max"]) if moved_any else 0.0)
        assert abs(l2 - l1) <= b_loss, (k, l1, l2, b_loss)
        assert abs(l1) <= 100 * b_loss or abs(1.01 * l2 - l1) > b_loss
        scale = max(float(g.abs().max()) for g in g1.values())
        drift = _max_diff(g1, gr)
        assert drift > 0, "the reordered run moved no gradient: it measures nothing"
        b = _bound(drift, scale)
        assert _max_diff(g1, g2) <= b, (k, _max_diff(g1, g2), b, drift, scale)
        # Strict enough for a real bug: a gradient off by 1%, or by the world size, fails.
        for factor in (1.01, 0.99, 2.0, 0.5):
            assert _max_diff(g1, {n: factor * g for n, g in g2.items()}) > b, factor
        # | |g2| − |g1| | ≤ |g2 − g1| (the gradients as saved), plus each run's fp32 rounding of
        # its norm (a sum of squares over ~10^5 entries: ≤ 32 ulps relative, pairwise summation)
        n1, n2 = one["grad_norm"][k], two["grad_norm"][k]
        b_norm = _norm({n: g2[n] - g1[n] for n in g1}) + 2 * 32 * EPS32 * n1
        assert abs(n2 - n1) <= b_norm, (k, n1, n2, b_norm)
        assert abs(1.01 * n2 - n1) > b_norm and abs(2 * n2 - n1) > b_norm
        # SGD, p ← p − lr·g: the weights' difference grows by lr times the gradients' and by one
        # rounding per run (1 ulp of the tensor's largest entry each)
        moved = {n: float((w2[n] - w1[n]).abs().max()) + lr * b + 2 * EPS32 * 2 * float(w1[n].abs().max())
                 for n in w1}
    for n in one["params"]:
        err = float((two["params"][n] - one["params"][n]).abs().max())
        assert err <= moved[n], (n, err, moved[n])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The 1-process run and its reordered twin (the bound), shared by the comparisons."""
    d = tmp_path_factory.mktemp("one")
    return _run(1, d / "one.pt"), _run(1, d / "rev.pt", reverse=True)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, one_process):
    one, rev = one_process
    two = _run(2, tmp_path / "two.pt")
    assert (one["world"], rev["world"], two["world"]) == (1, 1, 2)
    # The loss is exactly 0 on the on-policy first mini-batch (Δ = 0), ~0.02 on the second.
    assert_processes_match(one, rev, two)
    # The update did something, so the comparison is not vacuous.
    assert max(float(g.abs().max()) for g in one["grads"][1].values()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [4, 2])
def test_tensor_parallel_head_matches_one_process(tmp_path, nproc, one_process):
    """tensor_parallel_size=2: the loss head's vocabulary split over 2 ranks, with 2
    data-parallel ranks (4 processes, a 2 x 2 mesh) or 1 (2 processes), against 1 process."""
    one, rev = one_process
    tp = _run(nproc, tmp_path / "tp.pt", tp=2)
    assert tp["world"] == nproc and tp["head_split"] == [(0, 64), (64, 128)]
    assert_processes_match(one, rev, tp)
    assert float(one["grads"][1]["head.lm_head.weight"].abs().max()) > 0
    # Clipping the same gradients to norm 1: the norm is one fp32 sum of squares over ~10^6
    # entries in torch's clip_grad_norm_ (≤ 32 ulps relative, pairwise summation) and a float64
    # one with the split head; the clipped gradients differ by that relative error of the scale
    # plus the rounding of each product (2 ulps).
    n1, n2 = one["clip_norm"], tp["clip_norm"]
    assert n1 > 100 and abs(n2 - n1) <= 32 * EPS32 * n1, (n1, n2)
    for n, g1 in one["clipped"].items():
        bound = (32 + 2) * EPS32 * float(g1.abs().max())
        assert float((tp["clipped"][n] - g1).abs().max()) <= bound, n
    assert abs(_norm(tp["clipped"]) - 1.0) < 1e-4  # clipped to max_norm 1 (less torch's 1e-6 guard)


if __name__ == "__main__":
    _worker(sys.argv[1])


@pytest.mark.slow
def test_trainer_under_torchrun_then_resume_in_one_process(tmp_path):
    """The whole loop with 2 processes (DAPO: dynamic sampling and rewards gathered over ranks),
    a refused re-run into the same output_dir (one line, exit 2), then a 1-process resume."""
    import json
    out = tmp_path / "run"
    args = ["-m", "opo_train", "max_steps=3", "sft_steps=2", "sft_batch_size=8", "prompts_per_step=4",
            "group_size=4", "max_new_tokens=4", "loss=dapo", "dynamic_sampling_metric=shaped_reward",
            "save_every=2", "val_every=3",
            "val_size=8", "plot=false", f"output_dir={out}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"

    def torchrun(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", "--master_addr=127.0.0.1", *args, *extra]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    r = torchrun()
    _assert_ran(r)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2, 3] and "val_accuracy" in rows[2]
    assert all(x["optimizer_steps"] == 2 for x in rows)
    # dynamic sampling over 2 ranks: dropped groups refilled by extra rounds (at most 1 + 3)
    assert all(x["groups_kept_first_round"] <= x["groups_kept"] <= 4 and x["sampling_rounds"] <= 4
               for x in rows)
    assert any(x["groups_kept"] > x["groups_kept_first_round"] for x in rows)
    assert (out / "hf_model" / "config.json").exists()
    r = torchrun()
    errors = [x for x in (r.stdout + r.stderr).splitlines() if x.startswith("opo-train: error")]
    assert r.returncode != 0 and len(errors) == 1 and "'output_dir'" in errors[0]
    r = subprocess.run([sys.executable, *[a if a != "max_steps=3" else "max_steps=4" for a in args],
                        "resume=true"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2, 3, 4]
