"""opo's losses inside verl (>= 0.9.1): the registered "opo" policy losses, held against
opo_kernels' own losses and a float64 formula, and opo's baselines held against verl's own
``compute_policy_loss_vanilla`` / ``compute_policy_loss_gspo`` on the same tensors."""
import copy
import importlib
import math
import re
import sys
from pathlib import Path

import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos",
                                 reason="verl>=0.9.1 not installed (pip install -r requirements/integrations.txt)")
from verl.workers.config.actor import FSDPActorConfig  # noqa: E402

import opo_kernels  # noqa: E402
from opo_kernels import escort_weights, opo_loss, policy_loss  # noqa: E402
from opo_kernels.integrations import verl as opo_verl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
B, T, G = 8, 7, 4


def _config(**kw):
    base = dict(strategy="fsdp", rollout_n=G, ppo_micro_batch_size_per_gpu=2, ppo_mini_batch_size=8,
                clip_ratio_c=1e9)  # opo has no dual clip: clip_ratio_c large enough to be inactive
    base.update(kw)
    return FSDPActorConfig(**base)


def _batch(seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 5, 3, 6, 7, 2, 4, 7])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -torch.rand(B, T, generator=g) * 3.0
    logp = (old + spread * torch.randn(B, T, generator=g)).clamp(max=0.0)
    # advantages as verl hands them: one value per sequence, broadcast over its tokens
    adv_seq = torch.randn(B, generator=g)
    adv = adv_seq[:, None].expand(B, T).clone()
    return logp, old, adv, adv_seq, mask


def _grad(fn, logp):
    x = logp.clone().requires_grad_(True)
    loss, metrics = fn(x)
    loss.backward()
    return loss.detach(), x.grad, metrics


def _close(a, b, rtol=1e-5, atol=1e-7):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


def test_registered_in_verl_registry():
    opo_verl.register()
    assert core_algos.get_policy_loss_fn("opo") is opo_verl.compute_policy_loss_opo
    assert core_algos.get_policy_loss_fn("opo_group_softmax") is opo_verl.compute_policy_loss_opo_group_softmax


@pytest.mark.parametrize("mode,opts", [("seq-mean-token-mean", dict(level="sequence", seq_reduce="mean")),
                                       ("seq-mean-token-sum", dict(level="sequence", seq_reduce="sum")),
                                       ("token-mean", dict(level="token"))])
def test_registered_opo_equals_opo_loss(mode, opts):
    opo_verl.register(alpha=0.3, mu=0.7)
    fn = core_algos.get_policy_loss_fn("opo")
    logp, old, adv, adv_seq, mask = _batch()
    cfg = _config()
    l1, g1, m1 = _grad(lambda x: fn(old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask,
                                    loss_agg_mode=mode, config=cfg, rollout_is_weights=None), logp)
    l2, g2, _ = _grad(lambda x: opo_loss(x, old, adv_seq, mask, alpha=0.3, mu=0.7, **opts), logp)
    _close(l1, l2)
    _close(g1, g2)
    assert g1.abs().sum() > 0 and torch.all(g1[~mask] == 0)
    assert math.isclose(m1["actor/ppo_kl"], float(((old - logp) * mask).sum() / mask.sum()), rel_tol=1e-5)
    assert "actor/opo_chi2" in m1 and "actor/opo_omega_std" in m1


def _paper_reference(logp, old, adv_seq, mask, w_seq, alpha, mu):
    """float64 paper-mode OPO (level=sequence, seq_reduce=mean), each sequence's term times w_i."""
    m = mask.double()
    delta = ((logp.double() - old.double()) * m).sum(-1) / m.sum(-1)
    omega = escort_weights(adv_seq.double(), alpha=alpha).double()
    return (w_seq * (-omega * delta + 0.5 * mu * delta ** 2)).mean(), {}


def test_registered_opo_float64_formula_and_rollout_is_weights():
    opo_verl.register(alpha=0.4, mu=1.0)
    fn = core_algos.get_policy_loss_fn("opo")
    logp, old, adv, adv_seq, mask = _batch(seed=3)
    cfg = _config()
    # a sequence-level rollout correction (verl's rollout_is="sequence"): one weight per sequence
    w_seq = torch.linspace(0.5, 2.0, B, dtype=torch.float64)
    for weights in (None, w_seq[:, None].expand(B, T).float()):
        ws = torch.ones(B, dtype=torch.float64) if weights is None else w_seq
        l1, g1, m1 = _grad(lambda x: fn(old, x, adv, mask, "seq-mean-token-mean", cfg, weights), logp)
        l2, g2, _ = _grad(lambda x: _paper_reference(x, old, adv_seq, mask, ws, 0.4, 1.0),
                          logp.double())
        _close(g1, g2)  # the gradient carries the weights ...
        l0, _ = _paper_reference(logp, old, adv_seq, mask, torch.ones(B, dtype=torch.float64), 0.4, 1.0)
        _close(l1, l0)  # ... the reported value is the unweighted OPO loss (documented)
        if weights is not None:
            assert not torch.allclose(g1.double(), _grad(lambda x: _paper_reference(
                x, old, adv_seq, mask, torch.ones(B, dtype=torch.float64), 0.4, 1.0), logp.double())[1])
    tok_mean = float((w_seq[:, None] * mask).sum() / mask.sum())  # token mean of the weights
    assert m1["actor/opo_is_weight_mean"] == pytest.approx(tok_mean, rel=1e-6)


def test_global_batch_info_scaling_matches_agg_loss():
    """With verl's global batch info (dp ranks and micro-batches), the returned loss is this call's share
    of the global mean, exactly as verl's agg_loss scales its own losses."""
    opo_verl.register(omega="estimator")
    fn = core_algos.get_policy_loss_fn("opo")
    logp, old, _, adv_seq, mask = _batch(seed=5)
    omega = escort_weights(adv_seq)  # as adv_estimator=opo_escort hands them: ω per token
    adv = torch.where(mask, omega[:, None], 0.0)
    for mode, opts, info in [("seq-mean-token-mean", dict(), dict(dp_size=2, global_batch_size=32)),
                             ("token-mean", dict(level="token"), dict(dp_size=4, batch_num_tokens=300))]:
        cfg = _config()
        cfg.global_batch_info.update(info)
        l1, g1, _ = _grad(lambda x: fn(old, x, adv, mask, mode, cfg, None), logp)
        l2, g2, _ = _grad(lambda x: opo_loss(x, old, adv_seq, mask, omega=omega, **opts), logp)
        local = B if mode != "token-mean" else int(mask.sum())
        denom = info.get("global_batch_size", info.get("batch_num_tokens"))
        scale = local / denom * info["dp_size"]
        # verl's own agg_loss on the same per-unit values gives the same scale
        ones = torch.ones(B, T)
        ref_scale = core_algos.agg_loss(ones, mask, mode, **cfg.global_batch_info) / \
            core_algos.agg_loss(ones, mask, mode)
        assert scale == pytest.approx(float(ref_scale), rel=1e-6)
        _close(l1, l2 * scale)
        _close(g1, g2 * scale)
    # ω from each call's advantages would be normalized over this part of the batch only: refused
    opo_verl.register()
    cfg = _config()
    cfg.global_batch_info.update(dp_size=1, global_batch_size=2 * B)
    with pytest.raises(ValueError, match="opo_escort"):
        fn(old, logp, adv, mask, "seq-mean-token-mean", cfg, None)
    opo_verl.register()


def test_group_softmax_registered():
    opo_verl.register(vocab_size=1000)
    fn = core_algos.get_policy_loss_fn("opo_group_softmax")
    logp, old, adv, adv_seq, mask = _batch(seed=7)
    cfg = _config()
    l1, g1, _ = _grad(lambda x: fn(old, x, adv, mask, "seq-mean-token-mean", cfg, None), logp)
    l2, g2, _ = _grad(lambda x: policy_loss(x, old, adv_seq, mask, loss="opo", escort="group_softmax",
                                            group_size=G, vocab_size=1000), logp)
    _close(l1, l2)
    _close(g1, g2)


def _verl_pair(name, **cfg_kw):
    cfg = _config(**cfg_kw)
    return core_algos.get_policy_loss_fn(name), cfg


@pytest.mark.parametrize("opo_name,verl_name,mode,clip,extra", [
    ("grpo", "vanilla", "seq-mean-token-mean", (0.2, 0.2), {}),
    ("dapo", "vanilla", "token-mean", (0.2, 0.28), {}),
    ("dr_grpo", "vanilla", "seq-mean-token-sum-norm", (0.2, 0.2), {"max_completion_length": T}),
    ("gspo", "gspo", "seq-mean-token-mean", (3e-4, 4e-4), {}),
])
def test_baselines_match_verl(opo_name, verl_name, mode, clip, extra):
    """opo's baselines against verl's own losses, loss and gradient, fp32 <= 1e-5 relative.
    verl's dual clip is made inactive (clip_ratio_c=1e9): the comparison covers the plain clip."""
    lo, hi = clip
    fn, cfg = _verl_pair(verl_name, clip_ratio=lo, clip_ratio_low=lo, clip_ratio_high=hi)
    spread = 0.3 if opo_name != "gspo" else 0.002
    logp, old, adv, adv_seq, mask = _batch(seed=11, spread=spread)
    l1, g1, m1 = _grad(lambda x: fn(old, x, adv, mask, mode, cfg, None), logp)
    l2, g2, m2 = _grad(lambda x: policy_loss(x, old, adv_seq, mask, loss=opo_name, clip_eps_low=lo,
                                             clip_eps_high=hi, **extra), logp)
    _close(l1, l2)
    _close(g1, g2)
    assert m1["actor/pg_clipfrac"] > 0  # the clip is active in this batch: the test can tell them apart


def test_dual_clip_is_not_in_opo():
    """With verl's default clip_ratio_c=3 and a ratio beyond 3 on a negative advantage, verl's dual clip
    bounds the loss and opo's grpo does not: a gap closed by clip_ratio_c."""
    fn, cfg = _verl_pair("vanilla", clip_ratio_c=3.0)
    logp, old, adv, adv_seq, mask = _batch(seed=13)
    logp = logp.clone()
    old = old.clone()
    old[0, :] = logp[0, :] - 2.0  # ratio e^2 > 3
    adv[0] = -1.0
    adv_seq[0] = -1.0
    l1, *_ = _grad(lambda x: fn(old, x, adv, mask, "seq-mean-token-mean", cfg, None), logp)
    l2, *_ = _grad(lambda x: policy_loss(x, old, adv_seq, mask, loss="grpo"), logp)
    assert not torch.allclose(l1, l2)


def test_bad_input_named():
    opo_verl.register()
    fn = core_algos.get_policy_loss_fn("opo")
    logp, old, adv, adv_seq, mask = _batch()
    with pytest.raises(ValueError, match="loss_agg_mode"):
        fn(old, logp, adv, mask, "token-sum", _config(), None)
    bad = adv.clone()
    bad[1, 0] += 1.0  # token-level advantages (e.g. GAE): OPO needs one advantage per sequence
    with pytest.raises(ValueError, match="advantages"):
        fn(old, logp, bad, mask, "seq-mean-token-mean", _config(), None)
    with pytest.raises(ValueError, match="alpha"):
        opo_verl.register(alpha=2.0)
    with pytest.raises((ValueError, TypeError), match="bogus"):
        opo_verl.register(bogus=1)
    opo_verl.register()


def test_import_error_names_package_and_version(monkeypatch):
    import importlib.metadata as md
    real = md.version
    monkeypatch.setattr(md, "version", lambda p: "0.8.0" if p == "verl" else real(p))
    monkeypatch.delitem(sys.modules, "opo_kernels.integrations.verl")
    with pytest.raises(ImportError, match=r"verl>=0\.9\.1.*verl==0\.8\.0"):
        importlib.import_module("opo_kernels.integrations.verl")
    monkeypatch.setattr(md, "version", real)
    monkeypatch.setitem(sys.modules, "verl", None)  # not installed
    monkeypatch.delitem(sys.modules, "opo_kernels.integrations.verl", raising=False)
    with pytest.raises(ImportError, match=r"verl>=0\.9\.1"):
        importlib.import_module("opo_kernels.integrations.verl")


def _readme_block(title):
    text = (ROOT / "README.md").read_text()
    sec = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", sec, re.S)
    assert blocks, f"no python block under '## {title}'"
    return blocks


def test_readme_use_with_verl_runs():
    for code in _readme_block("Use with verl"):
        exec(compile(code, "README.md:Use with verl", "exec"), {})
    assert core_algos.get_policy_loss_fn("opo") is opo_verl.compute_policy_loss_opo
    assert opo_verl.OPTIONS == {"alpha": 0.4, "mu": 1.0}
    opo_verl.disable_logprob_hook()
    opo_verl.register()
    assert opo_kernels.__version__


def _tiny_model(seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ROOT / "opo_train/assets/tiny_qwen3"),
                                            dtype=torch.float32)


@pytest.mark.parametrize("kind", ["gemma2", "cohere"])
def test_logprob_hook_applies_the_models_logit_transform(monkeypatch, kind):
    """A model whose forward soft-caps (Gemma-2) or scales (Cohere) its logits: the hook's log-probs,
    entropies and gradients are those of the model's own logits / temperature (float64 autograd
    through the model's forward)."""
    import transformers
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0,
                  eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    cfg = (transformers.Gemma2Config(final_logit_softcapping=0.5, **common) if kind == "gemma2"
           else transformers.CohereConfig(logit_scale=4.0, **common))
    torch.manual_seed(2)
    base = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # logits of order 1, so the cap saturates for some
        base.get_output_embeddings().weight.mul_(8.0 if kind == "gemma2" else 1.0)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    wts = torch.linspace(-1, 1, ids.shape[1], dtype=torch.float64)
    ref = copy.deepcopy(base).double()
    logits = ref(input_ids=ids, attention_mask=torch.ones_like(ids)).logits / 0.7
    lsm = torch.log_softmax(logits, -1)
    lp1 = lsm.gather(-1, torch.roll(ids, -1, -1)[..., None]).squeeze(-1)
    en1 = -(lsm.exp() * lsm).sum(-1)
    ((lp1 * wts).sum() - 0.3 * en1.sum()).backward()
    model = copy.deepcopy(base)
    monkeypatch.setattr(type(model), "forward", opo_verl.forward_with_opo_backend)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), return_dict=True, temperature=0.7)
    ((out.log_probs.double() * wts).sum() - 0.3 * out.entropy.double().sum()).backward()
    # fp32 model against float64: relative to each quantity's size
    _close(out.log_probs.double(), lp1.detach(), rtol=1e-5, atol=1e-5)
    _close(out.entropy.double(), en1.detach(), rtol=1e-5, atol=1e-5)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert float((p.grad.double() - q.grad).norm() / q.grad.norm()) <= 1e-4, n


def test_logprob_hook_matches_verl_torch_backend(monkeypatch):
    """The hook's log-probs, entropies and gradients equal verl's own fused path (its torch
    implementation, FusedLinearForPPO, which runs on CPU) on the same model and tokens."""
    from verl.models.transformers import dense_common, monkey_patch
    opo_verl.enable_logprob_hook()
    assert monkey_patch.patch_forward_with_backends is opo_verl._patch_forward_with_backends
    ids = torch.randint(3, 128, (3, 11), generator=torch.Generator().manual_seed(0))
    outs = []
    for fwd in (dense_common.forward_with_torch_backend, opo_verl.forward_with_opo_backend):
        model = _tiny_model()
        monkeypatch.setattr(type(model), "forward", fwd)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), return_dict=True, temperature=0.7)
        # the log-probs' and the entropy bonus's gradients (verl's entropy_coeff)
        ((out.log_probs * torch.linspace(-1, 1, ids.shape[1])).sum() - 0.3 * out.entropy.sum()).backward()
        outs.append((out.log_probs.detach(), out.entropy.detach(),
                     {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lp1, en1, g1), (lp2, en2, g2) = outs
    _close(lp2, lp1)
    _close(en2, en1, rtol=1e-5, atol=1e-6)
    for n in g1:  # fp32 through a 4-layer backbone: relative to each gradient's norm
        assert float((g2[n] - g1[n]).norm() / g1[n].norm()) <= 1e-5, n
    # verl's patch function now routes dense text models to the hook
    model = _tiny_model()
    monkeypatch.setattr(type(model), "forward", type(model).forward)
    monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
    assert type(model).forward is opo_verl.forward_with_opo_backend
    opo_verl.disable_logprob_hook()
    assert monkey_patch.patch_forward_with_backends is not opo_verl._patch_forward_with_backends


@pytest.mark.parametrize("agg,opo_loss", [("token-mean", "bnpo"), ("seq-mean-token-mean", "grpo")])
def test_dual_clip_matches_verl_vanilla(agg, opo_loss):
    """opo's clip_ratio_c (dual clip) equals verl's compute_policy_loss_vanilla on the same tensors."""
    from omegaconf import OmegaConf
    g = torch.Generator().manual_seed(0)
    B, T = 6, 9
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = (old + 0.8 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=0.0)
    logp.requires_grad_(True)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.2
    cfg = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": None,
                            "clip_ratio_c": 1.5, "global_batch_info": {}})
    want, _ = core_algos.compute_policy_loss_vanilla(old, logp, adv[:, None].expand(B, T), mask.float(),
                                                     loss_agg_mode=agg, config=cfg)
    gw, = torch.autograd.grad(want, logp)
    got, _ = opo_kernels.policy_loss(logp, old, adv, mask, loss=opo_loss, clip_ratio_c=1.5)
    gg, = torch.autograd.grad(got, logp)
    _close(got.double(), want.double(), rtol=1e-6, atol=1e-9)
    _close(gg.double(), gw.double(), rtol=1e-5, atol=1e-9)


def test_opo_escort_estimator_whole_batch_omega_any_micro_batch():
    """adv_estimator=opo_escort emits ω over the whole training batch (GRPO's outcome advantages, then
    the escort weights, in float64 here); with omega='estimator' the loss summed over micro-batches of
    1, 2 and 8 sequences, each scaled by verl's global_batch_info, equals the whole-batch loss and
    gradient."""
    import numpy as np
    opo_verl.register(omega="estimator", alpha=0.3, mu=0.8)
    est = core_algos.get_adv_estimator_fn(opo_verl.ADV_ESTIMATOR)
    logp, old, _, _, mask = _batch(seed=21)
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(B, generator=g)
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), mask.sum(-1) - 1] = scores  # outcome reward on the last valid token
    index = np.array([i // G for i in range(B)])
    adv, _ = est(token_level_rewards=rewards, response_mask=mask.float(), index=index,
                 config={"norm_adv_by_std_in_grpo": True})
    # float64 reference: GRPO's group z-score (verl: unbiased std, eps 1e-6), then ω over the batch
    s = scores.double().view(-1, G)
    a = ((s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-6)).reshape(-1)
    x = (1 - 0.3) * a
    w = torch.exp(x - x.max())
    omega = (w - w.mean()) / w.std(unbiased=False)
    _close(adv[mask], omega[:, None].expand(B, T)[mask], rtol=1e-5, atol=1e-6)
    assert torch.all(adv[~mask] == 0)

    fn = core_algos.get_policy_loss_fn("opo")
    whole = _grad(lambda x: _paper_reference(x, old, a, mask, torch.ones(B, dtype=torch.float64), 0.3, 0.8),
                  logp.double())
    for mb in (1, 2, 8):
        x = logp.clone().requires_grad_(True)
        total = 0.0
        for i in range(0, B, mb):
            cfg = _config(ppo_micro_batch_size_per_gpu=mb)
            cfg.global_batch_info.update(dp_size=1, global_batch_size=B)
            sl = slice(i, i + mb)
            loss, _ = fn(old[sl], x[sl], adv[sl], mask[sl], "seq-mean-token-mean", cfg, None)
            loss.backward()
            total += float(loss.detach())
        assert total == pytest.approx(float(whole[0]), rel=1e-5, abs=1e-7), mb
        _close(x.grad, whole[1])
    opo_verl.register()
    with pytest.raises(ValueError, match="omega='estimator'"):
        est(token_level_rewards=rewards, response_mask=mask.float(), index=index, config=None)


def test_register_accepts_every_option_its_losses_read():
    opo_verl.register(alpha=0.5, mu=0.9, tau=1.2, beta_r=0.2, adaptive_tau=False, ratio="exact",
                      normalize="center", max_log_ratio=5.0)
    fn = core_algos.get_policy_loss_fn("opo_group_softmax")
    logp, old, adv, adv_seq, mask = _batch(seed=9)
    l1, g1, _ = _grad(lambda x: fn(old, x, adv, mask, "seq-mean-token-mean", _config(), None), logp)
    l2, g2, _ = _grad(lambda x: policy_loss(x, old, adv_seq, mask, loss="opo", escort="group_softmax",
                                            group_size=G, alpha=0.5, mu=0.9, tau=1.2, beta_r=0.2,
                                            adaptive_tau=False, max_log_ratio=5.0), logp)
    _close(l1, l2)
    _close(g1, g2)
    fn = core_algos.get_policy_loss_fn("opo")
    l1, g1, _ = _grad(lambda x: fn(old, x, adv, mask, "seq-mean-token-mean", _config(), None), logp)
    l2, g2, _ = _grad(lambda x: opo_loss(x, old, adv_seq, mask, alpha=0.5, mu=0.9, tau=1.2, ratio="exact",
                                         normalize="center", max_log_ratio=5.0), logp)
    _close(l1, l2)
    _close(g1, g2)
    opo_verl.register()


def test_group_softmax_vocab_size_from_model_config():
    """Not registered, V comes from the actor's model config (verl sets actor_config.model_config)."""
    from types import SimpleNamespace
    opo_verl.register()
    fn = core_algos.get_policy_loss_fn("opo_group_softmax")
    logp, old, adv, adv_seq, mask = _batch(seed=7)
    cfg = _config()
    with pytest.raises(ValueError, match="vocab_size"):
        fn(old, logp, adv, mask, "seq-mean-token-mean", cfg, None)
    cfg.model_config = SimpleNamespace(hf_config=SimpleNamespace(vocab_size=1000))
    l1, g1, _ = _grad(lambda x: fn(old, x, adv, mask, "seq-mean-token-mean", cfg, None), logp)
    l2, g2, _ = _grad(lambda x: policy_loss(x, old, adv_seq, mask, loss="opo", escort="group_softmax",
                                            group_size=G, vocab_size=1000), logp)
    _close(l1, l2)
    _close(g1, g2)


def test_bad_verl_inputs_named():
    opo_verl.register()
    fn = core_algos.get_policy_loss_fn("opo")
    logp, old, adv, adv_seq, mask = _batch()
    m2 = mask.float()
    m2[0, 0] = 0.5
    with pytest.raises(ValueError, match="response_mask must be binary"):
        fn(old, logp, adv, m2, "seq-mean-token-mean", _config(), None)
    w = torch.ones(B, T)
    w[1, 0] = -0.5
    with pytest.raises(ValueError, match="rollout_is_weights.*-0.5"):
        fn(old, logp, adv, mask, "seq-mean-token-mean", _config(), w)
    cfg = _config()
    cfg.global_batch_info.update(dp_size=1, global_batch_size=0)
    with pytest.raises(ValueError, match="global_batch_size"):
        fn(old, logp, adv, mask, "seq-mean-token-mean", cfg, None)
    with pytest.raises(ValueError, match="old_log_prob must be"):
        fn(old[:, :-1], logp, adv, mask, "seq-mean-token-mean", _config(), None)
    with pytest.raises(ValueError, match="response_mask must be"):
        fn(old, logp, adv, mask[:-1], "seq-mean-token-mean", _config(), None)
    with pytest.raises(ValueError, match="rollout_is_weights must be"):
        fn(old, logp, adv, mask, "seq-mean-token-mean", _config(), w[:, :2])
    with pytest.raises(ValueError, match="omega"):
        opo_verl.register(omega="batch")


@pytest.mark.parametrize("hook", [False, True], ids=["plain", "logprob_hook"])
def test_verl_fsdp_engine_actor_on_cpu(tmp_path, hook):
    """A real verl actor: verl's FSDP2 engine on the tiny Qwen3 (tests/verl_engine_actor.py, in its own
    process with TRL hidden: see its docstring). compute_log_prob, then loss_mode=opo with ω from the
    opo_escort estimator: micro-batches of 1, 2 and 8 sequences give the whole-batch loss (= opo's
    policy_loss on the engine's own log-probs) and gradient; per-call ω is refused; one optimizer
    update moves every parameter. With the hook, verl's fused log-prob path runs opo's linear_logprobs
    on the FSDP2-sharded, untied head."""
    import json
    import os
    import subprocess
    out = tmp_path / "out.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(ROOT / "tests" / "verl_engine_actor.py"), str(out)] + (["--logprob-hook"] if hook else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["forward"] == ("forward_with_opo_backend" if hook else "Qwen3ForCausalLM.forward")
    assert res["head_types"] == (["DTensor"] if hook else [])  # the hook is handed FSDP2's sharded head
    assert res["logp_finite"]
    # fp32 sums over the batch's 33 tokens and 8 sequences in another order: a few ulps of the loss
    for mb in ("1", "2", "8"):
        assert res["loss"][mb] == pytest.approx(res["opo_loss"], rel=1e-6, abs=1e-7), mb
        # the same gradients summed per micro-batch in another order through a 4-layer fp32 backbone
        assert res["grad_rel_diff"][mb] <= 1e-5, mb
    assert res["per_call_refused"]
    assert res["moved"] == res["n_params"] and math.isfinite(res["grad_norm"]) and res["grad_norm"] > 0
    assert "actor/opo_chi2" in res["metrics"]


def test_readme_verl_command_is_valid_verl_config(monkeypatch):
    """The README's verl command: its overrides apply to verl's own trainer config (no unknown key), the
    actor section converts to verl's FSDPActorConfig, and with its environment the module registers
    the estimator and the loss it names; a micro-batch of the estimator's advantages then trains."""
    import shlex
    import numpy as np
    from omegaconf import OmegaConf
    text = (ROOT / "README.md").read_text().split("## Use with verl\n", 1)[1].split("\n## ", 1)[0]
    cmd = re.findall(r"```bash\n(.*?)```", text, re.S)[0].replace("\\\n", " ")
    words = shlex.split(cmd)
    env = dict(w.split("=", 1) for w in words[:words.index("python")])
    overrides = [w for w in words[words.index("verl.trainer.main_ppo") + 1:]]
    assert words[words.index("python"):words.index("python") + 3] == ["python", "-m", "verl.trainer.main_ppo"]
    cfg = OmegaConf.load(Path(core_algos.__file__).parents[1] / "config" / "_generated_ppo_trainer.yaml")
    OmegaConf.set_struct(cfg, True)
    for o in overrides:
        key, value = o.split("=", 1)
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", key
        OmegaConf.update(cfg, key, value, merge=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert env["VERL_USE_EXTERNAL_MODULES"] == cfg.actor_rollout_ref.model.external_lib
    importlib.import_module(cfg.actor_rollout_ref.model.external_lib)
    opo_verl._from_env()
    est = core_algos.get_adv_estimator_fn(cfg.algorithm.adv_estimator)
    a = cfg.actor_rollout_ref.actor  # verl's own actor config class checks these values
    actor = _config(loss_agg_mode=a.loss_agg_mode, policy_loss={"loss_mode": a.policy_loss.loss_mode})
    fn = core_algos.get_policy_loss_fn(actor.policy_loss["loss_mode"])
    logp, old, _, _, mask = _batch(seed=2)
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), mask.sum(-1) - 1] = torch.randn(B, generator=torch.Generator().manual_seed(0))
    adv, _ = est(token_level_rewards=rewards, response_mask=mask.float(), index=np.arange(B) // G,
                 config=cfg.algorithm)
    actor.global_batch_info.update(dp_size=1, global_batch_size=B)
    loss, _ = fn(old[:2], logp[:2], adv[:2], mask[:2], actor.loss_agg_mode, actor, None)  # one micro-batch
    assert torch.isfinite(loss)
    monkeypatch.undo()
    opo_verl.register()
