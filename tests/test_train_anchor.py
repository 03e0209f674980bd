"""Mini-batch anchoring and the policy's loss path, against an independent float64 reference."""
import math

import pytest
import torch

from opo_train.config import load_config
from opo_train.distributed import setup, teardown
from opo_train.model import build_policy
from opo_train.train import Seq, anchor_logprobs, collate, reshard, update_policy


@pytest.fixture(scope="module")
def info():
    info = setup("cpu")  # a 1-rank gloo group, as the trainer makes without torchrun
    yield info
    teardown(info)


def make_seqs(n_groups, G, seed=0, vocab=100):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n_groups * G):
        p = int(torch.randint(3, 7, (1,), generator=g))
        c = int(torch.randint(1, 6, (1,), generator=g))
        ids = torch.randint(2, vocab, (p + c,), generator=g).tolist()
        seqs.append(Seq(ids, p))
    rewards = torch.rand(n_groups * G, generator=g, dtype=torch.float64).view(n_groups, G)
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).view(-1)
    for s, a in zip(seqs, adv.tolist()):
        s.advantage = a
    return seqs


def test_delta_zero_on_first_minibatch_then_nonzero(info):
    cfg = load_config(None, ["minibatches=2", "lr=1e-3", "sft_steps=0", "max_steps=1"])
    policy = build_policy(cfg, info, seed=0)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    seqs = make_seqs(4, 4)
    batches = [collate(seqs[:8], 0, info.device, False), collate(seqs[8:], 0, info.device, False)]
    anchors = anchor_logprobs(policy, batches, cfg)
    frozen = [a.clone() for a in anchors]
    seen = {}

    def hook(epoch, k, pol):
        # Independent Δ for this mini-batch: current weights (before this step), frozen anchor.
        with torch.no_grad():
            logp, _ = pol(batches[k], mode="logprobs")
        reshard(pol)  # a no-grad forward leaves FSDP's root unsharded (see train.anchor_logprobs)
        m = batches[k]["mask"].double()
        d = ((logp.double() - frozen[k].double()) * m).sum(1) / m.sum(1)
        seen[k] = d.abs().mean().item()

    stats = update_policy(policy, opt, batches, anchors, cfg, info, cfg.lr, grad_hook=hook)
    assert stats[0]["delta_abs_mean"] == 0.0 and stats[0]["chi2"] == 0.0
    assert stats[1]["delta_abs_mean"] > 1e-5
    assert stats[1]["delta_abs_mean"] == pytest.approx(seen[1], rel=1e-4)
    assert seen[0] == 0.0
    assert all(torch.equal(a, f) for a, f in zip(anchors, frozen))  # the anchor was not moved


def ref_opo_loss_f64(hidden, weight, seqs, old, alpha=0.4, mu=1.0):
    """Paper mode (contract: "The OPO loss"), sequence level, mean-reduced, log ratio, z-scored ω, float64."""
    terms, xs = [], []
    for i, s in enumerate(seqs):
        n = len(s.ids)
        z = hidden[i, :n - 1].double() @ weight.double().T
        lsm = torch.log_softmax(z, -1)
        tgt = torch.tensor(s.ids[1:])
        logp = lsm[torch.arange(n - 1), tgt]
        pos = torch.arange(s.prompt_len - 1, n - 1)
        delta = (logp[pos] - old[i, pos].double()).mean()
        terms.append(delta)
        xs.append((1 - alpha) * s.advantage)
    w = torch.exp(torch.tensor(xs, dtype=torch.float64))
    om = (w - w.mean()) / (w.std(unbiased=False) + 1e-6)
    d = torch.stack(terms)
    return (-om * d + 0.5 * mu * d * d).mean()


@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_policy_loss_matches_float64_reference(info, impl):
    cfg = load_config(None, ["sft_steps=0", "max_steps=1", "fsdp=false", f"loss_impl={impl}"])
    policy = build_policy(cfg, info, seed=1)
    seqs = make_seqs(2, 4, seed=5)
    b = collate(seqs, 0, info.device, False)
    g = torch.Generator().manual_seed(9)
    old = torch.randn(b["targets"].shape, generator=g) * 0.05 - 4.6
    old = torch.where(b["mask"], old, torch.zeros_like(old))
    with torch.no_grad():
        hidden = policy.backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        anchor_now, _ = policy(b, mode="logprobs", impl=impl)
    old = anchor_now + old * 0.0 + torch.where(b["mask"], 0.01 * torch.randn(old.shape, generator=g), 0.0)
    from opo_train.train import loss_kwargs
    loss, m = policy(b, mode="loss", advantages=b["advantages"], old_logps=old,
                     loss_kwargs=loss_kwargs(cfg, info), impl=impl)
    ref = ref_opo_loss_f64(hidden, policy.head.lm_head.weight.detach(), seqs, old)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)
    assert math.isfinite(m["entropy"]) and m["num_seqs"] == len(seqs)


def test_packed_batches_match_padded(info):
    """Padding-free batches (one row, restarting position_ids, cu_seqlens to the loss) give the
    padded batch's log-probs and loss (transformers isolates packed sequences by position_ids)."""
    cfg = load_config(None, ["sft_steps=0", "max_steps=1", "fsdp=false"])
    policy = build_policy(cfg, info, seed=2)
    seqs = make_seqs(2, 4, seed=11)
    bp = collate(seqs, 0, info.device, False)
    bk = collate(seqs, 0, info.device, True)
    assert bk["input_ids"].shape == (1, sum(len(s.ids) for s in seqs))
    assert bk["cu_seqlens"].tolist()[-1] == bk["input_ids"].shape[1]
    with torch.no_grad():
        lp, _ = policy(bp, mode="logprobs")
        lk, _ = policy(bk, mode="logprobs")
    padded = torch.cat([lp[i][bp["mask"][i]] for i in range(len(seqs))])
    torch.testing.assert_close(lk[bk["mask"]], padded, rtol=1e-5, atol=1e-5)
    from opo_train.train import loss_kwargs
    g = torch.Generator().manual_seed(0)
    noise = 0.05 * torch.randn(lp.shape, generator=g)
    old_p = lp + noise
    old_k = torch.zeros_like(lk)
    old_k[bk["mask"]] = torch.cat([old_p[i][bp["mask"][i]] for i in range(len(seqs))])
    kw = loss_kwargs(cfg, info)
    l1, _ = policy(bp, mode="loss", advantages=bp["advantages"], old_logps=old_p, loss_kwargs=kw)
    l2, _ = policy(bk, mode="loss", advantages=bk["advantages"], old_logps=old_k, loss_kwargs=kw)
    assert l1.item() != 0.0 and l2.item() == pytest.approx(l1.item(), rel=1e-4, abs=1e-6)
