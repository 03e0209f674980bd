"""``python -m bench.accum_drift`` at a tiny size: its gradient is the float64 gradient of the
OPO loss it says it trains, its two bf16 runs differ only in how the chunks of the weight
gradient are summed, and it writes the JSON and Markdown it reports."""
import json

import torch

from bench import accum_drift
from opo_kernels import group_advantages, opo_loss


class _Hold:
    """An optimizer that keeps the gradients it is given and steps nothing."""

    def step(self):
        pass


def test_fp32_gradient_is_float64_autograd():
    P, G, T, H, V = 2, 3, 4, 8, 40
    g = torch.Generator().manual_seed(0)
    h = torch.randn(P, T, H, generator=g).requires_grad_(True)
    w = (torch.randn(V, H, generator=g) * 0.5).requires_grad_(True)
    good = torch.rand(P, 1, T, V, generator=g) < 0.3
    gumbel = -torch.log(-torch.log(torch.rand(P, G, T, V, generator=g).clamp_(1e-20, 1.0)))
    accum_drift._step("fp32", h, w, _Hold(), good, gumbel, P, G, T, 2, 1)
    # float64 reference: the same samples (Gumbel-max), rewards, advantages and OPO loss
    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    logq = torch.log_softmax((h64 @ w64.T).unsqueeze(1), -1)                   # (P, 1, T, V)
    logq32 = torch.log_softmax((h.detach().reshape(P * T, H) @ w.detach().T).view(P, 1, T, V), -1)
    tok = (logq32 + gumbel).argmax(-1)  # the bench's draws, from its fp32 log-probs
    reward = good.expand(-1, G, -1, -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1).double().mean(-1)
    adv = group_advantages(reward.reshape(-1), G)
    lp = logq.expand(-1, G, -1, -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1).reshape(P * G, T)
    # opo_loss runs in fp32: the reference takes its float64 gradient w.r.t. the log-probs
    x = lp.detach().requires_grad_(True)
    loss, _ = opo_loss(x, None, adv)
    (gx,) = torch.autograd.grad(loss, x)
    want_h, want_w = torch.autograd.grad((lp * gx.double()).sum(), [h64, w64])
    # fp32 GEMMs over ≤ P·G·T = 24 rows and H = 8: a few dozen roundings of O(max) terms
    for got, want in ((h.grad, want_h), (w.grad, want_w)):
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= 64 * 2.0 ** -24 * scale


def test_runs_and_writes(tmp_path):
    out = tmp_path / "drift"
    args = ["--p", "2", "--g", "2", "--t", "4", "--h", "16", "--v", "64", "--steps", "3",
            "--seeds", "0", "--window", "2"]
    _, res, summ = accum_drift.main(args + ["--chunks", "1", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    md = out.with_suffix(".md").read_text()
    assert set(data["trajectories"]["seeds"]["0"]) == set(accum_drift.RUNS)
    assert "python -m bench.accum_drift" in md and "| bf16 / bf16 sum |" in md
    # one chunk: one product, rounded once either way — the two bf16 runs are the same run
    t = res["seeds"]["0"]
    assert t["bf16 / bf16 sum"] == {**t["bf16 / fp32 sum"], "w_dist_fp32sum": [0.0] * 3}
    assert summ["entropy_bf16sum_minus_fp32sum"]["0"] == 0.0
    # many chunks: the bf16 sum rounds each product, and the weights part
    _, res, _ = accum_drift.main(args + ["--chunks", "8"])
    assert res["seeds"]["0"]["bf16 / bf16 sum"]["w_dist_fp32sum"][-1] > 0.0
