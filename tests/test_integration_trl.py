"""opo's fused loss inside TRL (>= 1.16): OPOTrainer held against stock GRPOTrainer.compute_loss
(same model, same generated batch: loss and every parameter gradient, fp32, <= 1e-5 relative),
trained end to end on the shipped tiny model, and its construction-time errors."""
import copy
import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl>=1.16 not installed (pip install -r requirements/integrations.txt)")
datasets = pytest.importorskip("datasets", reason="datasets (a trl dependency) not installed")
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from opo_kernels.integrations.trl import OPOConfig, OPOTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "opo_train" / "assets" / "tiny_qwen3"
G = 4


def _tokenizer():
    return PreTrainedTokenizerFast(tokenizer_file=str(TINY / "tokenizer.json"), pad_token="<|pad|>",
                                   eos_token="<|endoftext|>", unk_token="<|unk|>")


def _model(seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY), dtype=torch.float32)


def _dataset(n=8):
    return datasets.Dataset.from_dict({"prompt": [f"{1000 + 37 * i}>" for i in range(n)]})


def _reward(completions, **kw):
    # varied rewards within each group (so advantages are not all 0)
    return [float(sum(ch.isdigit() for ch in c)) + 0.1 * len(c) for c in completions]


def _args(cls, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=G,
                max_completion_length=6, max_steps=3, learning_rate=1e-3, logging_steps=1,
                report_to=[], save_strategy="no", use_cpu=True, seed=0, temperature=1.0,
                dataloader_num_workers=0, bf16=False)
    base.update(kw)
    return cls(**base)


def _trainer(cls, cfg_cls, tmp_path, model, **kw):
    return cls(model=model, reward_funcs=_reward, args=_args(cfg_cls, tmp_path, **kw),
               train_dataset=_dataset(), processing_class=_tokenizer())


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """One generated and scored batch (TRL's own generation), with an anchor moved off-policy so
    that the ratios and clips take part."""
    tr = _trainer(GRPOTrainer, GRPOConfig, tmp_path_factory.mktemp("gen"), _model(), loss_type="grpo")
    raw = [{"prompt": p} for p in _dataset(2)["prompt"] for _ in range(G)]
    torch.manual_seed(0)
    inputs = tr._generate_and_score_completions(raw)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logps, _, _ = tr._get_per_token_logps_and_entropies(tr.model, ids, att, inputs["completion_ids"].size(1))
    g = torch.Generator().manual_seed(1)
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=g)
    assert inputs["completion_mask"].sum() > 0 and inputs["advantages"].abs().sum() > 0
    return inputs


CASES = [("grpo", {}, "grpo"), ("dapo", {}, "dapo"), ("bnpo", {}, "bnpo"), ("dr_grpo", {}, "dr_grpo"),
         ("cispo", {"epsilon_high": 1.2}, "cispo"), ("sapo", {}, "sapo"),
         ("grpo", {"importance_sampling_level": "sequence", "epsilon": 3e-2, "epsilon_high": 4e-2}, "gspo"),
         # two-sided clip; LUSPO; the sequence-level ratio with every loss type
         ("grpo", {"delta": 1.05}, "grpo"), ("dapo", {"delta": 1.05}, "dapo"),
         ("luspo", {"importance_sampling_level": "sequence"}, "luspo"), ("luspo", {}, "luspo"),
         ("dapo", {"importance_sampling_level": "sequence"}, "dapo"),
         ("bnpo", {"importance_sampling_level": "sequence"}, "bnpo"),
         ("dr_grpo", {"importance_sampling_level": "sequence"}, "dr_grpo"),
         ("cispo", {"importance_sampling_level": "sequence", "epsilon_high": 1.01}, "cispo"),
         ("sapo", {"importance_sampling_level": "sequence"}, "sapo"),
         # off-policy sequence masking (against the anchor here; with vLLM's log-probs below)
         ("vespo", {}, "vespo"), ("vespo", {"vespo_k_pos": 1.0, "vespo_lambda_neg": 4.0}, "vespo"),
         ("grpo", {"off_policy_mask_threshold": 0.02}, "grpo"), ("dapo", {"off_policy_mask_threshold": 0.02}, "dapo"),
         ("grpo", {"importance_sampling_level": "sequence", "epsilon": 3e-2, "epsilon_high": 4e-2,
                   "off_policy_mask_threshold": 0.02}, "gspo")]


def _same_loss_and_grads(stock, ours, inputs, ga):
    """One compute_loss + backward on each trainer (same model copy, same inputs): the losses and
    every parameter gradient agree (fp32, 1e-5 relative). Returns stock's gradients."""
    results = []
    for tr in (stock, ours):
        tr.model.train()
        tr.current_gradient_accumulation_steps = ga
        tr.model.zero_grad()
        loss = tr.compute_loss(tr.model, dict(inputs))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in tr.model.named_parameters()}))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-7)
    assert set(g1) == set(g2)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-5, atol=1e-6, msg=n)
    return g1


@pytest.mark.parametrize("loss_type,extra,opo_loss", CASES,
                         ids=[c[0] + "/" + c[2] + "".join(f"-{k}={v}" for k, v in c[1].items()) for c in CASES])
@pytest.mark.parametrize("ga", [1, 2])
def test_oracle_matches_grpo_trainer(tmp_path, batch, loss_type, extra, opo_loss, ga):
    base = _model(seed=1)
    kw = dict(loss_type=loss_type, gradient_accumulation_steps=ga, **extra)
    if loss_type in ("dapo", "cispo", "vespo"):
        kw["steps_per_generation"] = ga
    stock = _trainer(GRPOTrainer, GRPOConfig, tmp_path / "a", copy.deepcopy(base), **kw)
    ours = _trainer(OPOTrainer, OPOConfig, tmp_path / "b", copy.deepcopy(base), **kw)
    assert ours.opo_loss_name == opo_loss
    g1 = _same_loss_and_grads(stock, ours, batch, ga)
    assert g1["lm_head.weight"].abs().sum() > 0
    # TRL's metric names are logged by OPOTrainer too
    assert ours._metrics["train"]["entropy"] and stock._metrics["train"]["entropy"]
    assert ours._metrics["train"]["entropy"][-1] == pytest.approx(stock._metrics["train"]["entropy"][-1], rel=1e-5)
    key = {"cispo": "cispo_clip_ratio", "gspo": None, "sapo": None,
           "vespo": "vespo/phi_seq_mean"}.get(opo_loss, "clip_ratio/region_mean")
    if key and extra.get("importance_sampling_level") != "sequence":
        assert ours._metrics["train"][key][-1] == pytest.approx(
            stock._metrics["train"][key][-1], rel=1e-5, abs=1e-7)


def test_opo_loss_no_vocab_logits(tmp_path, batch, monkeypatch):
    """compute_loss never runs the LM head module (no (B, T, V) logits): it calls opo's fused loss
    with the head's weight; and the loss equals fused_opo_loss on the same hidden states."""
    from opo_kernels import fused_opo_loss
    tr = _trainer(OPOTrainer, OPOConfig, tmp_path, _model(seed=2), opo_alpha=0.3, opo_mu=0.5)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    calls = []
    h = tr.model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    loss = tr.compute_loss(tr.model, dict(batch))
    h.remove()
    assert not calls
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    C = batch["completion_ids"].size(1)
    hidden = tr.model.model(input_ids=ids, attention_mask=att).last_hidden_state[:, :-1][:, -C:]
    ref, _ = fused_opo_loss(hidden, tr.model.lm_head.weight, batch["completion_ids"], batch["advantages"],
                            batch["old_per_token_logps"], batch["completion_mask"], alpha=0.3, mu=0.5)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    for k in ("opo/chi2", "opo/delta_abs_mean", "opo/omega_std", "entropy"):
        assert tr._metrics["train"][k], k


def test_end_to_end_tiny_model_trains(tmp_path):
    model = _model(seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = _trainer(OPOTrainer, OPOConfig, tmp_path, model, loss_type="opo", max_steps=3)
    out = tr.train()
    assert out.global_step == 3
    logs = [r for r in tr.state.log_history if "loss" in r]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    assert any("opo/chi2" in r for r in tr.state.log_history)
    moved = [n for n, p in tr.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "lm_head.weight" in moved and len(moved) == len(before)


@pytest.mark.parametrize("kw,name", [
    (dict(loss_type="dapo", entropy_coef=0.01, top_entropy_quantile=0.5), "top_entropy_quantile"),
    (dict(loss_type="vespo", use_vllm=True), "vespo"),
])
def test_unsupported_options_raise_at_config(tmp_path, kw, name):
    with pytest.raises((NotImplementedError, ValueError), match=re.escape(name)):
        _args(OPOConfig, tmp_path, **kw)


def _trl_is_ratio(mode, clip_max, clip_min, old, sampling, mask):
    """TRL 1.16's own importance-sampling weights: the block of GRPOTrainer._generate_and_score_completions
    that forms them, run as it is written there (the oracle)."""
    import inspect
    import math
    import textwrap
    src = inspect.getsource(GRPOTrainer._generate_and_score_completions).splitlines()
    i0 = next(i for i, ln in enumerate(src) if "per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps)" in ln)
    i1 = next(i for i in range(i0, len(src)) if "Possible values are 'token_truncate'" in src[i])
    block = textwrap.dedent("\n".join(src[i0:i1 + 2]))
    import types
    ns = {"torch": torch, "math": math, "old_per_token_logps": old, "sampling_per_token_logps": sampling,
          "mask": mask, "self": types.SimpleNamespace(vllm_importance_sampling_mode=mode,
                                                      vllm_importance_sampling_clip_max=clip_max,
                                                      vllm_importance_sampling_clip_min=clip_min)}
    exec(compile(block, "trl-is-block", "exec"), ns)
    return ns["vllm_importance_sampling_ratio"]


TERM_CASES = [
    ("grpo", dict(beta=0.04), None),
    ("dapo", dict(beta=0.04, entropy_coef=0.01), None),
    ("bnpo", dict(top_entropy_quantile=0.5, entropy_coef=0.01), None),
    ("sapo", dict(beta=0.04, use_bias_correction_kl=False, top_entropy_quantile=0.6), None),
    ("cispo", dict(epsilon_high=1.2, beta=0.04), ("token_mask", 1.3, 0.7)),
    ("grpo", dict(), ("token_truncate", 1.2, None)),
    ("dapo", dict(entropy_coef=0.02), ("sequence_mask", 2.0, 0.5)),
    ("grpo", dict(importance_sampling_level="sequence", epsilon=3e-2, epsilon_high=4e-2, beta=0.04),
     ("sequence_truncate", 1.5, None)),
    ("dr_grpo", dict(beta=0.04, entropy_coef=0.01), ("token_truncate", 1.2, 0.9)),
    ("grpo", dict(off_policy_mask_threshold=0.02), ("token_truncate", 2.0, None)),
    ("cispo", dict(off_policy_mask_threshold=0.02), ("sequence_mask", 3.0, 0.2)),
]


@pytest.mark.parametrize("loss_type,extra,is_mode", TERM_CASES,
                         ids=[f"{c[0]}-{'-'.join(c[1])}-{c[2][0] if c[2] else 'noIS'}" for c in TERM_CASES])
@pytest.mark.parametrize("ga", [1, 2])
def test_terms_match_grpo_trainer(tmp_path, batch, loss_type, extra, is_mode, ga):
    """KL (beta), the entropy bonus, top-entropy masking and vLLM importance sampling: OPOTrainer equals
    stock GRPOTrainer.compute_loss, loss and every gradient (TRL's own code forms the IS weights)."""
    base = _model(seed=1)
    if extra.get("beta"):  # TRL loads its reference model from the model's path: give it one
        base.save_pretrained(tmp_path / "m")
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    kw = dict(loss_type=loss_type, gradient_accumulation_steps=ga, **extra)
    if loss_type in ("dapo", "cispo"):
        kw["steps_per_generation"] = ga
    stock = _trainer(GRPOTrainer, GRPOConfig, tmp_path / "a", copy.deepcopy(base), **kw)
    ours = _trainer(OPOTrainer, OPOConfig, tmp_path / "b", copy.deepcopy(base), **kw)
    inputs = dict(batch)
    g = torch.Generator().manual_seed(7)
    old = inputs["old_per_token_logps"]
    inputs["ref_per_token_logps"] = old + 0.2 * torch.randn(old.shape, generator=g)
    if is_mode is not None:
        samp = old + 0.3 * torch.randn(old.shape, generator=g)
        if not extra.get("off_policy_mask_threshold"):  # (off-policy masking: a NaN counts as the anchor's)
            samp[0, 0] = float("nan")  # a token vLLM could not score
        inputs["sampling_per_token_logps"] = samp
        inputs["importance_sampling_ratio"] = _trl_is_ratio(*is_mode, old, samp, inputs["completion_mask"])
        for tr in (stock, ours):  # the correction as use_vllm would switch it on (vLLM is not installed here)
            tr.use_vllm, tr.vllm_importance_sampling_correction = True, True
            (tr.vllm_importance_sampling_mode, tr.vllm_importance_sampling_clip_max,
             tr.vllm_importance_sampling_clip_min) = is_mode
    _same_loss_and_grads(stock, ours, inputs, ga)
    if extra.get("beta"):
        assert ours._metrics["train"]["kl"][-1] == pytest.approx(stock._metrics["train"]["kl"][-1], rel=1e-5)


def _same_metric(stock, ours, key):
    a, b = stock._metrics["train"][key], ours._metrics["train"][key]
    assert a and len(a) == len(b), key
    assert b[-1] == pytest.approx(a[-1], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["static", "adaptive"])
def test_entropy_bonus_metrics_and_adaptive_controller(tmp_path, batch, loss_type, adaptive):
    """TRL's entropy bonus with its metric names (policy_loss, entropy_coef), and use_adaptive_entropy:
    over three optimizer steps the coefficient TRL's controller applies (0 until the measured entropy is
    at or below entropy_target), the loss, every gradient and the metrics equal stock GRPOTrainer's."""
    base = _model(seed=2)
    kw = dict(loss_type=loss_type, entropy_coef=0.05)
    if adaptive:  # the tiny model's entropy (~log 128 ≈ 4.85 nats) is below this target: the coefficient grows
        kw.update(use_adaptive_entropy=True, entropy_target=6.0, entropy_coef_delta=0.02)
    stock = _trainer(GRPOTrainer, GRPOConfig, tmp_path / "a", copy.deepcopy(base), **kw)
    ours = _trainer(OPOTrainer, OPOConfig, tmp_path / "b", copy.deepcopy(base), **kw)
    for _ in range(3 if adaptive else 1):
        _same_loss_and_grads(stock, ours, batch, 1)
        for key in ("policy_loss", "entropy_coef", "entropy"):
            _same_metric(stock, ours, key)
    if adaptive:
        assert ours.entropy_coef == pytest.approx(stock.entropy_coef) and stock.entropy_coef > 0.05


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_moe_router_aux_loss_matches_grpo_trainer(tmp_path, batch, loss_type):
    """A Mixture-of-Experts model (a tiny Qwen3-MoE with router logits on): OPOTrainer adds the router
    load-balancing loss as TRL does (router_aux_loss_coef · aux / accumulation steps): loss, every
    gradient (the routers' included) and the aux_loss metric equal stock GRPOTrainer's."""
    from transformers import Qwen3MoeConfig
    cfg = Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=4, num_experts_per_tok=2, output_router_logits=True,
                         router_aux_loss_coef=0.05, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    kw = dict(loss_type=loss_type)
    stock = _trainer(GRPOTrainer, GRPOConfig, tmp_path / "a", copy.deepcopy(base), **kw)
    ours = _trainer(OPOTrainer, OPOConfig, tmp_path / "b", copy.deepcopy(base), **kw)
    assert stock.aux_loss_enabled and ours.aux_loss_enabled
    for ga in (1, 2):
        g = _same_loss_and_grads(stock, ours, batch, ga)
        assert any("gate" in n and g[n].abs().sum() > 0 for n in g)  # the routers are trained
        _same_metric(stock, ours, "aux_loss")


def _head_model(kind):
    """A tiny offline model whose forward transforms the logits: Gemma-2 (tanh soft-capping),
    Cohere (logit_scale), Granite (divides by logits_scaling), each built from its config (no Hub)."""
    import transformers
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0, eos_token_id=1,
                  bos_token_id=None, tie_word_embeddings=False)
    if kind == "gemma2":  # a cap small enough that tanh saturates for the larger logits
        cfg = transformers.Gemma2Config(final_logit_softcapping=0.5, **common)
    elif kind == "cohere":
        cfg = transformers.CohereConfig(logit_scale=4.0, **common)
    elif kind == "granite":
        cfg = transformers.GraniteConfig(logits_scaling=0.25, **common)
    else:
        raise ValueError(kind)
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if kind == "gemma2":
        with torch.no_grad():  # logits of order 1 (a random tiny head gives ~0.1): the cap saturates
            model.get_output_embeddings().weight.mul_(8.0)
    return model


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
@pytest.mark.parametrize("loss_type,extra", [("grpo", {}), ("dapo", {"temperature": 0.7})])
def test_logit_transform_matches_grpo_trainer(tmp_path, batch, kind, loss_type, extra):
    """A model whose forward soft-caps or scales the logits (Gemma-2 final_logit_softcapping, Cohere
    logit_scale, Granite logits_scaling): OPOTrainer applies the same transform in opo's vocabulary
    pass, so the loss, every gradient and the entropy metric equal stock GRPOTrainer's, which reads the
    model's logits (and divides them by temperature)."""
    from opo_kernels.integrations.trl import head_transform
    base = _head_model(kind)
    kw = dict(loss_type=loss_type, **extra)
    stock = _trainer(GRPOTrainer, GRPOConfig, tmp_path / "a", copy.deepcopy(base), **kw)
    ours = _trainer(OPOTrainer, OPOConfig, tmp_path / "b", copy.deepcopy(base), **kw)
    expect = {"gemma2": {"logit_scale": 1.0, "softcap": 0.5}, "cohere": {"logit_scale": 4.0, "softcap": None},
              "granite": {"logit_scale": 4.0, "softcap": None}}[kind]
    assert head_transform(base.config.get_text_config()) == expect
    g = _same_loss_and_grads(stock, ours, batch, 1)
    assert g["lm_head.weight"].abs().sum() > 0
    _same_metric(stock, ours, "entropy")


def test_logit_transform_changes_the_loss(tmp_path, batch):
    """The oracle above can fail: with the model's transform dropped, OPOTrainer's loss differs."""
    base = _head_model("gemma2")
    stock = _trainer(GRPOTrainer, GRPOConfig, tmp_path / "a", copy.deepcopy(base), loss_type="grpo")
    ours = _trainer(OPOTrainer, OPOConfig, tmp_path / "b", copy.deepcopy(base), loss_type="grpo")
    ours._head_transform = {"logit_scale": 1.0, "softcap": None}
    with pytest.raises(AssertionError):
        _same_loss_and_grads(stock, ours, batch, 1)


@pytest.mark.parametrize("field,value", [("final_logit_softcapping", 0.0), ("logit_scale", -1.0),
                                         ("logits_scaling", float("inf")), ("lm_head_multiplier", "2")])
def test_unusable_logit_transform_raises_at_construction(tmp_path, field, value):
    base = _model()
    setattr(base.config, field, value)
    with pytest.raises(ValueError, match=f"model's {field}="):
        _trainer(OPOTrainer, OPOConfig, tmp_path, base, loss_type="grpo")


def test_opo_steps_per_generation_equals_one_call(tmp_path, batch):
    """loss_type='opo' with the generation batch split into micro-batches: ω and the normalizer come from
    the generation batch, so the accumulated gradient equals the one on the whole batch. (Not with
    entropy_coef: OPOTrainer keeps TRL's entropy bonus, a mean over each micro-batch's tokens / ga.)"""
    from opo_kernels import escort_weights
    _model(seed=4).save_pretrained(tmp_path / "m")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    grads = []
    for ga in (1, 2, 4):
        tr = _trainer(OPOTrainer, OPOConfig, tmp_path / f"s{ga}", copy.deepcopy(base), loss_type="opo",
                      gradient_accumulation_steps=ga, steps_per_generation=ga, beta=0.04)
        inputs = dict(batch)
        g = torch.Generator().manual_seed(7)
        inputs["ref_per_token_logps"] = inputs["old_per_token_logps"] + 0.2 * torch.randn(
            inputs["old_per_token_logps"].shape, generator=g)
        mask = inputs["completion_mask"]
        inputs["opo_omega"] = escort_weights(inputs["advantages"], valid=mask.sum(-1) > 0)
        inputs["opo_num_seqs"], inputs["opo_num_items"] = (mask.sum(-1) > 0).sum().float(), mask.sum().float()
        tr.model.train()
        tr.current_gradient_accumulation_steps = ga
        tr.model.zero_grad()
        B = inputs["advantages"].shape[0]
        for k in range(ga):
            sl = slice(k * B // ga, (k + 1) * B // ga)
            part = {key: (v[sl] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B else v)
                    for key, v in inputs.items()}
            tr.compute_loss(tr.model, part).backward()
        grads.append({n: p.grad.clone() for n, p in tr.model.named_parameters()})
    for gk in grads[1:]:
        for n in grads[0]:
            torch.testing.assert_close(gk[n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_bad_opo_option_raises(tmp_path):
    with pytest.raises(ValueError, match="alpha"):
        _args(OPOConfig, tmp_path, opo_alpha=1.5)
    with pytest.raises(ValueError, match="opo_alpha"):
        _args(OPOConfig, tmp_path, loss_type="grpo", opo_alpha=0.7)  # an OPO option with a baseline


@pytest.mark.parametrize("kw,field", [
    (dict(loss_type="grpo", epsilon=1.0), "epsilon"), (dict(loss_type="dapo", epsilon=-0.1), "epsilon"),
    (dict(loss_type="grpo", epsilon_high=-0.5), "epsilon_high"),
    (dict(loss_type="cispo", epsilon_high=float("nan")), "epsilon_high"),
    (dict(beta=-0.1), "beta"), (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(vllm_importance_sampling_mode="bogus"), "vllm_importance_sampling_mode"),
    (dict(vllm_importance_sampling_clip_max=0.0), "vllm_importance_sampling_clip_max"),
    (dict(vllm_importance_sampling_clip_min=4.0, vllm_importance_sampling_clip_max=2.0),
     "vllm_importance_sampling_clip_min"),
    (dict(entropy_coef=-0.01), "entropy_coef"), (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
    (dict(loss_type="sapo", sapo_temperature_neg=0.0), "sapo_temperature_neg"),
    (dict(opo_backend="gpu"), "opo_backend"),
])
def test_config_checks_trl_fields_at_construction(tmp_path, kw, field):
    """Every field opo reads is checked when the OPOConfig is built, and the error names TRL's field."""
    with pytest.raises((ValueError, TypeError), match=rf"\b{field}\b"):
        _args(OPOConfig, tmp_path, **kw)


def test_peft_adapter_on_lm_head_raises(tmp_path):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="lm_head"):
        OPOTrainer(model=_model(), reward_funcs=_reward, args=_args(OPOConfig, tmp_path),
                   train_dataset=_dataset(), processing_class=_tokenizer(), peft_config=cfg)


def test_peft_adapter_elsewhere_trains_backbone(tmp_path):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    tr = OPOTrainer(model=_model(), reward_funcs=_reward, args=_args(OPOConfig, tmp_path, max_steps=1),
                    train_dataset=_dataset(), processing_class=_tokenizer(), peft_config=cfg)
    tr.train()
    assert any("lora" in n for n, p in tr.model.named_parameters() if p.requires_grad)


def test_import_error_names_package_and_version(monkeypatch):
    import importlib.metadata as md
    real = md.version
    monkeypatch.setattr(md, "version", lambda p: "1.15.0" if p == "trl" else real(p))
    monkeypatch.delitem(sys.modules, "opo_kernels.integrations.trl")
    with pytest.raises(ImportError, match=r"trl>=1\.16.*trl==1\.15\.0"):
        importlib.import_module("opo_kernels.integrations.trl")
    monkeypatch.setattr(md, "version", real)
    monkeypatch.setitem(sys.modules, "trl", None)
    monkeypatch.delitem(sys.modules, "opo_kernels.integrations.trl", raising=False)
    with pytest.raises(ImportError, match=r"trl>=1\.16"):
        importlib.import_module("opo_kernels.integrations.trl")


def test_readme_use_with_trl_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    sec = text.split("## Use with TRL\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", sec, re.S)
    assert blocks
    (tmp_path / "opo_train").symlink_to(ROOT / "opo_train")  # the snippet's paths are relative to the checkout
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        ns = {}
        exec(compile(code, "README.md:Use with TRL", "exec"), ns)
    assert isinstance(ns["trainer"], OPOTrainer) and ns["trainer"].state.global_step >= 1
