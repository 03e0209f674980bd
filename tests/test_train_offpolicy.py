"""Off-policy pieces of the trainer (issue 9, "The trainer uses them"): the rollout engines'
log-probs of the sampled tokens, the rollout/anchor mismatch, the config keys of the new loss
terms, the frozen reference model. Each against an independent float64 computation."""
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from opo_train.config import load_config
from opo_train.rollout import HFEngine, Sample

# ----------------------------------------------------------------------------------------------
# 1. HF engine: log-probs of the sampled tokens
# ----------------------------------------------------------------------------------------------


def _engine(*overrides):
    from opo_train.model import load_tokenizer
    cfg = load_config(None, ["sft_steps=0", "max_new_tokens=8", *overrides])
    tok = load_tokenizer(cfg)
    torch.manual_seed(3)
    eng = HFEngine(cfg, tok, torch.device("cpu"))
    with torch.no_grad():  # make EOS likely, so that rows finish early and get padded
        eng.model.lm_head.weight[tok.eos_token_id] += 0.6 * eng.model.model.norm.weight.sign()
    return cfg, tok, eng


def _top_p_filter_f64(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering (keep the smallest set of most likely tokens whose mass reaches top_p,
    at least one), written from its definition, in float64."""
    if top_p >= 1.0:
        return logits
    p = torch.softmax(logits, -1)
    order = torch.argsort(p, descending=True)
    mass_before = torch.cumsum(p[order], 0) - p[order]
    keep_sorted = mass_before < top_p
    keep = torch.zeros_like(keep_sorted)
    keep[order] = keep_sorted
    return logits.masked_fill(~keep, -math.inf)


def _teacher_forced_f64(model, prompt, tokens, temperature, top_p):
    """log π(token_t | prompt, tokens_<t) under the engine's sampling distribution, float64,
    one unpadded sequence at a time."""
    m64 = model.double() if next(model.parameters()).dtype != torch.float64 else model
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = m64(input_ids=ids).logits[0].double()
    out = []
    for t, tok_id in enumerate(tokens):
        z = _top_p_filter_f64(logits[len(prompt) - 1 + t] / temperature, top_p)
        out.append(float(torch.log_softmax(z, -1)[tok_id]))
    return out


@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.3, 0.9)])
def test_hf_engine_logprobs_match_teacher_forced_f64(temperature, top_p):
    import copy
    cfg, tok, eng = _engine(f"temperature={temperature}", f"top_p={top_p}")
    prompts = [tok("3817>", add_special_tokens=False)["input_ids"],
               tok("52>", add_special_tokens=False)["input_ids"],      # shorter: left padding
               tok("90412>", add_special_tokens=False)["input_ids"]]
    groups = eng.generate(prompts, 4, seed=11)
    ref_model = copy.deepcopy(eng.model).double()
    lengths, finished, worst = [], 0, 0.0
    for p, group in zip(prompts, groups):
        for s in group:
            assert s.logprobs is not None and len(s.logprobs) == len(s.tokens)
            ref = _teacher_forced_f64(ref_model, p, s.tokens, temperature, top_p)
            worst = max(worst, max(abs(a - b) for a, b in zip(s.logprobs, ref)))
            assert all(math.isfinite(x) and x <= 0 for x in s.logprobs)
            lengths.append(len(s.tokens))
            finished += not s.truncated
    assert worst < 2e-5, worst
    # Some rows ended early with EOS while others ran on: those were padded in the engine's
    # batch, and no padded position has a log-prob.
    assert finished > 0 and min(lengths) < cfg.max_new_tokens
    assert len(set(lengths)) > 1


def test_greedy_generation_has_no_logprobs_cost():
    cfg, tok, eng = _engine()
    out = eng.generate([tok("12>", add_special_tokens=False)["input_ids"]], 1, seed=0, greedy=True)
    assert out[0][0].logprobs is None


@pytest.mark.parametrize("packed", [False, True])
def test_collate_aligns_rollout_logprobs_with_targets(packed):
    from opo_train.train import Seq, collate
    seqs = [Seq([5, 6, 7, 8, 9], 2, 0.5, True, [-0.1, -0.2, -0.3]),
            Seq([5, 6, 7], 1, -0.5, True, [-1.0, -2.0]),
            Seq([4, 4, 4, 4], 2, 0.0, False, [-7.0, -7.0])]     # invalid: masked, takes no part
    b = collate(seqs, 0, torch.device("cpu"), packed)
    rl, m, tg = b["rollout_logps"], b["mask"], b["targets"]
    assert rl.shape == tg.shape and rl.dtype == torch.float32
    got = rl[m].tolist()
    assert got == pytest.approx([-0.1, -0.2, -0.3, -1.0, -2.0])
    assert (rl[~m] == 0).all()
    # position t predicts targets[t]: the completion's first token is the target at prompt_len-1
    flat_t, flat_m = tg.reshape(-1), m.reshape(-1)
    assert flat_t[flat_m].tolist() == [7, 8, 9, 6, 7]


# ----------------------------------------------------------------------------------------------
# vLLM engine (a stand-in vllm module: vLLM cannot run here)
# ----------------------------------------------------------------------------------------------

class _FakeLLM:
    calls: list = []

    def __init__(self, **kw):
        _FakeLLM.calls.append(("init", kw))

    def generate(self, prompts, params, use_tqdm=False):
        _FakeLLM.calls.append(("generate", params))
        Lp = types.SimpleNamespace
        outs = []
        for p in params:
            # logprobs=0: one dict per generated token holding the sampled token only
            c1 = Lp(token_ids=[5, 6, 2], finish_reason="stop",
                    logprobs=[{5: Lp(logprob=-0.5, rank=3)}, {6: Lp(logprob=-1.25, rank=1)},
                              {2: Lp(logprob=-0.125, rank=2)}])
            c2 = Lp(token_ids=[7], finish_reason="length", logprobs=[{7: Lp(logprob=-3.0, rank=9)}])
            outs.append(Lp(outputs=[c1, c2][:p.n]))
        return outs


def test_vllm_engine_asks_for_sampled_token_logprobs(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM = _FakeLLM
    vllm.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: prompt_token_ids
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    for k in ("RANK", "WORLD_SIZE", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.delenv(k, raising=False)
    _FakeLLM.calls = []
    from opo_train.rollout import VLLMEngine
    eng = VLLMEngine(load_config(None, ["engine=vllm"]), tokenizer=None,
                     device=torch.device("cuda", 0))
    init_kw = _FakeLLM.calls[0][1]
    # the log-probs of the distribution sampled from (temperature / top-p applied), as TRL asks
    assert init_kw["logprobs_mode"] == "processed_logprobs"
    got = eng.generate([[1, 2]], 2, seed=0)
    params = _FakeLLM.calls[1][1]
    assert all(p.logprobs == 0 for p in params)
    assert got[0][0].tokens == [5, 6, 2] and got[0][0].logprobs == [-0.5, -1.25, -0.125]
    assert got[0][1].logprobs == [-3.0] and got[0][1].truncated
    eng.generate([[1, 2]], 1, seed=0, greedy=True)
    assert _FakeLLM.calls[-1][1][0].logprobs is None   # validation: no log-probs asked
