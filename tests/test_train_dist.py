"""2-process torchrun (gloo, CPU) vs 1 process on the same data: same losses, gradients, weights.

The file is also the worker: ``torchrun --nproc_per_node N tests/test_train_dist.py OUT``.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _worker(out_path: str) -> None:
    sys.path.insert(0, str(ROOT))
    from opo_train.config import load_config
    from opo_train.distributed import setup, teardown
    from opo_train.model import build_policy
    from opo_train.train import Seq, anchor_logprobs, collate, rank_share, update_policy

    # OPO_DIST_OVERRIDES: extra config overrides (tests/test_train_offpolicy.py: the loss terms)
    extra = os.environ.get("OPO_DIST_OVERRIDES", "").split()
    cfg = load_config(None, ["prompts_per_step=4", "group_size=4", "minibatches=2", "lr=1e-3",
                             "grad_clip=0", "sft_steps=0", "max_steps=1", *extra])
    info = setup("cpu")
    policy = build_policy(cfg, info, seed=0)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    # Fixed global data: 4 prompt groups x 4 sequences of varied lengths.
    g = torch.Generator().manual_seed(1)
    seqs = []
    for i in range(16):
        p, c = int(torch.randint(3, 7, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        seqs.append(Seq(torch.randint(2, 100, (p + c,), generator=g).tolist(), p,
                        float(torch.randn((), generator=g))))
    share = rank_share(4, 2, info.world, info.rank)
    batches = [collate([seqs[gi * 4 + s] for gi in mb for s in range(4)], 0, info.device, False)
               for mb in share]
    anchors = anchor_logprobs(policy, batches, cfg)
    refs = None
    if extra:  # rollout / reference log-probs: fixed functions of each token, whatever the layout
        for b, old in zip(batches, anchors):
            b["rollout_logps"] = torch.where(b["mask"], old + 0.3 * torch.cos(b["targets"].float()), 0.0)
        refs = [torch.where(b["mask"], old + 0.2 * torch.sin(b["targets"].float()), 0.0)
                for b, old in zip(batches, anchors)]
    grads = []

    def hook(epoch, k, pol):
        grads.append({n: p.grad.full_tensor().clone() for n, p in pol.named_parameters()})

    stats = update_policy(policy, opt, batches, anchors, cfg, info, cfg.lr, grad_hook=hook, refs=refs)
    params = {n: p.detach().full_tensor().clone() for n, p in policy.named_parameters()}
    if info.rank == 0:
        torch.save({"loss": [s["loss"] for s in stats], "grad_norm": [s["grad_norm"] for s in stats],
                    "grads": grads, "params": params, "world": info.world}, out_path)
    teardown(info)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# gloo can abort a rank at exit when its peer closes the connection first ("terminate called
# after throwing gloo::IoException ... Connection closed by peer"), after every collective is done.
# That exit code alone is tolerated; any Python traceback or other failure still fails, and the
# callers check the outputs the run must have written.
_GLOO_TEARDOWN = ("Connection closed by peer", "Connection reset by peer")


def _assert_ran(r) -> None:
    if r.returncode == 0:
        return
    text = r.stdout + r.stderr
    assert any(m in text for m in _GLOO_TEARDOWN) and "Traceback" not in text, \
        r.stdout[-3000:] + r.stderr[-3000:]


def _run(nproc: int, out: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", "--master_addr=127.0.0.1", __file__, str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    _assert_ran(r)
    return torch.load(out, weights_only=False)


# The tolerance. Both runs add the same fp32 terms in a different order (per-rank partial sums,
# then the all-reduce / reduce-scatter); each sum of n terms carries an order-dependent error of
# at most ~n·eps·Σ|term| (eps = 2^-24 per addition; in practice ~sqrt(n)·eps). The longest sums
# here (a gradient entry of the embedding or LM head: every token of the batch times a hidden
# contraction) have n ~ 10^3, so the order noise is below ~1e-4 of the gradient's scale; the
# measured noise is ~2e-5. A real bug is orders of magnitude larger: a missing all-reduce leaves
# each rank with half the batch (O(1) relative error), a wrong scale is a factor such as 2 or
# 1/2; the test asserts below that even a 1% scale error exceeds the tolerance.
RTOL = 1e-4


def _close(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= RTOL * scale


def _grads_close(g1: dict, g2: dict) -> bool:
    scale = max(float(g.abs().max()) for g in g1.values())
    return all(float((g2[n] - g1[n]).abs().max()) <= RTOL * scale for n in g1)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    one = _run(1, tmp_path / "one.pt")
    two = _run(2, tmp_path / "two.pt")
    assert (one["world"], two["world"]) == (1, 2)
    # The loss is exactly 0 on the on-policy first mini-batch (Δ = 0), ~0.02 on the second.
    for l1, l2 in zip(one["loss"], two["loss"]):
        assert _close(l1, l2, max(abs(l1), 1e-3)), (l1, l2)
        assert abs(l1) < 1e-3 or not _close(l1, 1.01 * l2, abs(l1))
    for n1, n2 in zip(one["grad_norm"], two["grad_norm"]):
        assert _close(n1, n2, n1), (n1, n2)
        assert not _close(n1, 1.01 * n2, n1) and not _close(n1, 2 * n2, n1)
    for g1, g2 in zip(one["grads"], two["grads"]):
        assert g1.keys() == g2.keys()
        assert _grads_close(g1, g2), max(float((g2[n] - g1[n]).abs().max()) for n in g1)
        # Strict enough for a real bug: a gradient off by 1%, or by the world size, fails.
        for factor in (1.01, 0.99, 2.0, 0.5):
            assert not _grads_close(g1, {n: factor * g for n, g in g2.items()}), factor
    for n in one["params"]:
        # Adam moves a weight by ~lr·sign(g) where g is tiny, so fp32 noise in a near-zero
        # gradient can show up as a fraction of lr (1e-3); anything real would be ~lr or more.
        err = float((two["params"][n] - one["params"][n]).abs().max())
        assert err <= 5e-5, (n, err)
    # The update did something, so the comparison is not vacuous.
    assert max(float(g.abs().max()) for g in one["grads"][1].values()) > 0


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
               f"--master_port={_free_port()}", "--master_addr=127.0.0.1", *args, *extra]
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
