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


CASES = [("grpo", {}, "grpo"), ("dapo", {}, "dapo"), ("bnpo", {}, "dapo"), ("dr_grpo", {}, "dr_grpo"),
         ("grpo", {"importance_sampling_level": "sequence", "epsilon": 3e-2, "epsilon_high": 4e-2}, "gspo")]


@pytest.mark.parametrize("loss_type,extra,opo_loss", CASES, ids=[c[0] + "/" + c[2] for c in CASES])
@pytest.mark.parametrize("ga", [1, 2])
def test_oracle_matches_grpo_trainer(tmp_path, batch, loss_type, extra, opo_loss, ga):
    base = _model(seed=1)
    kw = dict(loss_type=loss_type, gradient_accumulation_steps=ga, **extra)
    if loss_type == "dapo":
        kw["steps_per_generation"] = ga
    stock = _trainer(GRPOTrainer, GRPOConfig, tmp_path / "a", copy.deepcopy(base), **kw)
    ours = _trainer(OPOTrainer, OPOConfig, tmp_path / "b", copy.deepcopy(base), **kw)
    assert ours.opo_loss_name == opo_loss
    results = []
    for tr in (stock, ours):
        tr.model.train()
        tr.current_gradient_accumulation_steps = ga
        tr.model.zero_grad()
        loss = tr.compute_loss(tr.model, dict(batch))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in tr.model.named_parameters()}))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-7)
    assert set(g1) == set(g2)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-5, atol=1e-6, msg=n)
    assert g1["lm_head.weight"].abs().sum() > 0
    # TRL's metric names are logged by OPOTrainer too
    assert ours._metrics["train"]["entropy"] and stock._metrics["train"]["entropy"]
    assert ours._metrics["train"]["entropy"][-1] == pytest.approx(stock._metrics["train"]["entropy"][-1], rel=1e-5)
    if opo_loss != "gspo":
        assert ours._metrics["train"]["clip_ratio/region_mean"][-1] == pytest.approx(
            stock._metrics["train"]["clip_ratio/region_mean"][-1], rel=1e-5, abs=1e-7)


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
    (dict(beta=0.04), "beta"), (dict(entropy_coef=0.01), "entropy_coef"),
    (dict(use_adaptive_entropy=True), "use_adaptive_entropy"),
    (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
    (dict(loss_type="cispo"), "cispo"), (dict(loss_type="sapo"), "sapo"), (dict(loss_type="vespo"), "vespo"),
    (dict(loss_type="luspo"), "luspo"),
    (dict(delta=2.0), "delta"), (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold"),
    (dict(loss_type="dapo", importance_sampling_level="sequence"), "importance_sampling_level"),
    (dict(loss_type="opo", gradient_accumulation_steps=2), "steps_per_generation"),
])
def test_unsupported_options_raise_at_config(tmp_path, kw, name):
    with pytest.raises((NotImplementedError, ValueError), match=re.escape(name)):
        _args(OPOConfig, tmp_path, **kw)


def test_vllm_is_correction_raises(tmp_path):
    # vLLM's importance-sampling correction (on by default in TRL with use_vllm) needs issue 9
    with pytest.raises(NotImplementedError, match="vllm_importance_sampling_correction"):
        _args(OPOConfig, tmp_path, use_vllm=True, vllm_importance_sampling_correction=True)


def test_bad_opo_option_raises(tmp_path):
    with pytest.raises(ValueError, match="alpha"):
        _args(OPOConfig, tmp_path, opo_alpha=1.5)
    with pytest.raises(ValueError, match="opo_alpha"):
        _args(OPOConfig, tmp_path, loss_type="grpo", opo_alpha=0.7)  # an OPO option with a baseline


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
