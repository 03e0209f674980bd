"""Off-policy pieces of the trainer: the rollout engines'
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
from opo_train.rollout import HFEngine

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


def test_vllm_engine_asks_for_sampled_token_logprobs(install_fake_vllm):
    install_fake_vllm(_FakeLLM)
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


# ----------------------------------------------------------------------------------------------
# 2. Config keys of the off-policy terms
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,key", [
    (["is_correction=token_clip"], "is_correction"),
    (["is_clip_max=2.0"], "is_clip_max"),                  # no is_correction: it would do nothing
    (["is_correction=token_mask", "is_clip_min=5", "is_clip_max=2"], "is_clip_min"),
    (["is_correction=sequence_mask", "is_clip_min=-1"], "is_clip_min"),
    (["beta=-0.1"], "beta"),
    (["entropy_coef=-0.01"], "entropy_coef"),
    (["top_entropy_quantile=1.5"], "top_entropy_quantile"),
    (["beta=abc"], "beta"),
])
def test_bad_off_policy_keys_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=rf"config key '{key}'"):
        load_config(None, overrides)


def test_off_policy_keys_parse_and_reach_the_loss():
    from opo_train.distributed import DistInfo
    from opo_train.train import loss_kwargs
    cfg = load_config(None, ["is_correction=sequence_truncate", "is_clip_max=2.5", "is_clip_min=0.5",
                             "beta=0.04", "entropy_coef=0.01", "top_entropy_quantile=0.2"])
    kw = loss_kwargs(cfg, DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"),
                                   group=None, owns_group=False))
    assert {k: kw[k] for k in ("is_correction", "is_clip_max", "is_clip_min", "beta", "entropy_coef",
                               "top_entropy_quantile")} == {
        "is_correction": "sequence_truncate", "is_clip_max": 2.5, "is_clip_min": 0.5, "beta": 0.04,
        "entropy_coef": 0.01, "top_entropy_quantile": 0.2}
    assert load_config(None, ["is_correction=none"]).is_correction is None


def test_trainer_loss_keys_default_to_the_loss_defaults():
    """The trainer's loss keys are opo_kernels' loss options under the same names, with the same
    defaults (the loss owns them; a drifted default would silently change a run)."""
    import dataclasses

    import opo_train.config as C
    from opo_kernels.options import LossOptions

    assert {"alpha", "mu", "entropy_coef", "is_correction", "beta"} <= set(C.LOSS_OPTION_KEYS)
    loss_defaults = {f.name: f.default for f in dataclasses.fields(LossOptions)}
    cfg = C.Config()
    drift = {k: (getattr(cfg, k), loss_defaults[k]) for k in C.LOSS_OPTION_KEYS
             if k not in ("group_size", "max_completion_length")
             and getattr(cfg, k) != loss_defaults[k]}
    assert not drift, drift


# ----------------------------------------------------------------------------------------------
# 3. Mismatch, IS statistics, reference model
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def info():
    from opo_train.distributed import setup, teardown
    info = setup("cpu")
    yield info
    teardown(info)


def test_rollout_mismatch_against_f64(info):
    from opo_train.train import rollout_mismatch
    g = torch.Generator().manual_seed(0)
    batches, anchors, pairs = [], [], []
    for B, T in ((3, 5), (2, 7)):
        mask = torch.rand(B, T, generator=g) > 0.4
        roll = -torch.rand(B, T, generator=g) * 3
        old = roll + torch.randn(B, T, generator=g) * 0.3
        roll[~mask] = float("nan")  # masked positions take no part, whatever they hold
        batches.append({"mask": mask, "rollout_logps": roll})
        anchors.append(old)
        for i in range(B):
            for t in range(T):
                if mask[i, t]:
                    pairs.append((float(roll[i, t]), float(old[i, t])))
    got = rollout_mismatch(batches, anchors, info)
    k1 = sum(r - a for r, a in pairs) / len(pairs)
    k3 = sum(math.exp(a - r) - (a - r) - 1 for r, a in pairs) / len(pairs)
    assert got["mismatch_k1"] == pytest.approx(k1, rel=1e-6)
    assert got["mismatch_k3"] == pytest.approx(k3, rel=1e-6)
    assert got["mismatch_max_abs"] == pytest.approx(max(abs(a - r) for r, a in pairs), rel=1e-6)
    assert rollout_mismatch([{"mask": batches[0]["mask"]}], anchors[:1], info) == {}


def _seqs_and_policy(info, *overrides):
    from opo_train.model import build_policy
    from opo_train.train import Seq
    cfg = load_config(None, ["sft_steps=0", "max_steps=1", "lr=1e-3", *overrides])
    policy = build_policy(cfg, info, seed=0)
    g = torch.Generator().manual_seed(1)
    seqs = []
    for i in range(8):
        p, c = 3 + i % 3, 2 + i % 4
        ids = torch.randint(2, 100, (p + c,), generator=g).tolist()
        seqs.append(Seq(ids, p, float(torch.randn(1, generator=g)), True))
    return cfg, policy, seqs


def test_is_correction_reaches_the_loss_with_the_rollout_logprobs(info):
    """The trainer hands the engine's log-probs to the loss: the loss's IS weights are
    exp(anchor − rollout), truncated at is_clip_max, computed here by hand."""
    from opo_train.train import anchor_logprobs, collate, off_policy_metrics, update_policy, Experience
    cfg, policy, seqs = _seqs_and_policy(info, "is_correction=token_truncate", "is_clip_max=1.5",
                                         "minibatches=1")
    b = collate(seqs, 0, info.device, False)
    anchors = anchor_logprobs(policy, [b], cfg)
    # A rollout engine that differs from the trainer by a known log-ratio per token.
    shift = torch.linspace(-0.8, 0.8, b["mask"].numel()).view_as(b["mask"])
    b["rollout_logps"] = torch.where(b["mask"], anchors[0] - shift, 0.0)
    w = torch.exp(shift[b["mask"]].double())
    stats = update_policy(policy, torch.optim.SGD(policy.parameters(), lr=0.0), [b], anchors, cfg,
                          info, 0.0)
    exp = Experience(step=0, lr=0.0, rows=[], share=[], stats=stats)
    row = off_policy_metrics(exp, cfg, info)
    assert row["is_weight_mean"] == pytest.approx(float(w.clamp(max=1.5).mean()), rel=1e-5)
    assert row["is_weight_max"] == pytest.approx(1.5, rel=1e-6)
    assert row["is_weight_min"] == pytest.approx(float(w.min()), rel=1e-5)
    assert row["is_frac_cut"] == pytest.approx(float((w > 1.5).double().mean()), rel=1e-6)


def test_naive_loss_has_the_entropy_gradient(info):
    """loss_impl=naive with entropy_coef > 0: same gradient as the fused loss (held against a
    float64 reference in opo_kernels' tests), so the entropy bonus is differentiated there too."""
    from opo_train.train import anchor_logprobs, collate, loss_kwargs
    cfg, policy, seqs = _seqs_and_policy(info, "entropy_coef=0.5", "fsdp=false")
    b = collate(seqs, 0, info.device, False)
    old = anchor_logprobs(policy, [b], cfg)[0]
    grads = {}
    for impl in ("fused", "naive"):
        policy.zero_grad(set_to_none=True)
        loss, _ = policy(b, mode="loss", advantages=b["advantages"], old_logps=old,
                         loss_kwargs=loss_kwargs(cfg, info), impl=impl)
        loss.backward()
        grads[impl] = policy.head.lm_head.weight.grad.clone()
    assert torch.allclose(grads["naive"], grads["fused"], rtol=1e-4, atol=1e-7)


def test_reference_model_is_the_policy_at_rl_start_and_survives_resume(info, tmp_path):
    from opo_train.model import REFERENCE_FILE, build_reference, iter_full_params
    from opo_train.train import collate, reference_logprobs
    cfg, policy, seqs = _seqs_and_policy(info, "beta=0.1", "temperature=0.8")
    start = {n: t.clone() for n, t in iter_full_params(policy)}
    ref = build_reference(cfg, info, policy, tmp_path, resumed=False)
    assert (tmp_path / REFERENCE_FILE).exists()
    assert not any(p.requires_grad for p in ref.parameters())
    with torch.no_grad():  # the policy moves on; the reference must not
        for p in policy.parameters():
            p.add_(0.01)
    b = collate(seqs, 0, info.device, False)
    got = reference_logprobs(ref, [b], cfg)[0]
    # independent: an HF model with the start weights, float64, logits / T, log_softmax, gather
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_config(policy.hf_config)
    hf.load_state_dict(start, strict=False)
    hf = hf.double().eval()
    with torch.no_grad():
        logits = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
    lsm = torch.log_softmax(logits / 0.8, -1)
    want = lsm.gather(-1, b["targets"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    m = b["mask"]
    assert torch.allclose(got[m].double(), want[m], atol=2e-5)
    # a resumed run reloads the same reference, not the moved policy
    ref2 = build_reference(cfg, info, policy, tmp_path, resumed=True)
    assert torch.equal(reference_logprobs(ref2, [b], cfg)[0], got)
    with pytest.raises(ValueError, match="'beta'.*reference"):
        build_reference(cfg, info, policy, tmp_path / "elsewhere", resumed=True)


def test_run_logs_mismatch_is_and_kl_every_step(tmp_path):
    from opo_train import train
    small = ["prompts_per_step=4", "group_size=4", "max_new_tokens=4", "sft_steps=3", "val_every=0",
             "minibatches=2", "lr=1e-3", "plot=false", "tensorboard=false", "export_hf=false"]
    out = tmp_path / "run"
    terms = ["is_correction=sequence_mask", "is_clip_max=2.0", "beta=0.1", "entropy_coef=0.01",
             "top_entropy_quantile=0.8"]
    train(load_config(None, [*small, *terms, f"output_dir={out}", "max_steps=2"]))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        # fp32 on CPU: the engine and the trainer differ by rounding only
        assert 0 <= r["mismatch_k3"] < 1e-8 and abs(r["mismatch_k1"]) < 1e-5
        assert 0 <= r["mismatch_max_abs"] < 1e-4
        assert r["is_weight_mean"] == pytest.approx(1.0, abs=1e-4) and r["is_frac_cut"] == 0.0
        assert r["kl"] >= 0 and r["entropy_mask_frac"] == pytest.approx(0.8, abs=0.1)  # top 80%
    assert (out / "reference_model.pt").exists()
    train(load_config(None, [*small, *terms, f"output_dir={out}", "max_steps=3", "resume=true"]))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["kl"] > 0


@pytest.mark.parametrize("loss", ["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "gspo", "luspo", "vespo"])
def test_rank_weighting_recovers_the_whole_batch_loss(loss):
    """update_policy weights each rank's loss by ``loss_count``; for that to give the loss of
    the whole mini-batch, the count must be what the kernel's loss is a mean over. Two "ranks"
    (uneven halves of a batch) against the loss of the whole batch in one call."""
    import opo_kernels as ok
    from opo_train.train import loss_count
    cfg = load_config(None, [f"loss={loss}"])
    g = torch.Generator().manual_seed(5)
    B, T = 8, 6
    lengths = torch.tensor([6, 1, 2, 6, 3, 5, 4, 6])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = (logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1).clamp(max=0.0)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    kw = dict(loss=loss, max_completion_length=T)

    def call(sl):
        return ok.policy_loss(logp[sl], old[sl], adv[sl], mask[sl], **kw)

    whole, _ = call(slice(0, B))
    parts = [call(slice(0, 2)), call(slice(2, B))]
    counts = [loss_count(cfg, {k: float(v) for k, v in m.items()}, n)
              for (_, m), n in zip(parts, (2, B - 2))]
    combined = sum(float(l) * c for (l, _), c in zip(parts, counts)) / sum(counts)
    assert combined == pytest.approx(float(whole), rel=1e-6)


@pytest.mark.parametrize("terms", [
    "beta=0.5 entropy_coef=0.05 is_correction=token_truncate is_clip_max=1.2",
    "loss=grpo beta=0.5 entropy_coef=0.05 is_correction=sequence_mask is_clip_max=3",
])
def test_two_processes_match_one_with_the_loss_terms(tmp_path, monkeypatch, terms):
    """KL and entropy are token means while OPO's (and GRPO's) policy term is a sequence mean:
    with ranks holding different token / sequence ratios, the gradient of 2 processes must still
    equal 1 process's on the same data (tests/test_train_dist.py's worker and tolerance)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import test_train_dist as D
    monkeypatch.setenv("OPO_DIST_OVERRIDES", terms)
    one = D._run(1, tmp_path / "one.pt")
    rev = D._run(1, tmp_path / "rev.pt", reverse=True)
    two = D._run(2, tmp_path / "two.pt")
    D.assert_processes_match(one, rev, two)


def test_global_counts_padded_and_packed(info):
    from opo_train.train import Seq, collate, global_counts
    seqs = [Seq([5, 6, 7, 8], 2), Seq([5, 6], 1), Seq([4, 4, 4], 2, valid=False), Seq([3, 9, 9], 1)]
    for packed in (False, True):
        assert global_counts(collate(seqs, 0, info.device, packed), info) == (2 + 1 + 2, 3, 4)


def test_reference_model_of_a_model_path_is_that_checkpoint(info, tmp_path):
    from transformers import AutoModelForCausalLM
    from opo_train.model import REFERENCE_FILE, TINY_DIR, build_reference, iter_full_params
    torch.manual_seed(7)
    from transformers import AutoConfig
    saved = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(TINY_DIR)))
    saved.save_pretrained(str(tmp_path / "model"))
    cfg = load_config(None, ["sft_steps=0", "max_steps=1", "beta=0.1", f"model={tmp_path / 'model'}",
                             f"tokenizer={TINY_DIR}"])
    from opo_train.model import build_policy
    policy = build_policy(cfg, info, seed=0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    ref = build_reference(cfg, info, policy, tmp_path / "out", resumed=True)  # nothing to reload
    assert not (tmp_path / "out" / REFERENCE_FILE).exists()
    want = dict(saved.named_parameters())
    for n, t in iter_full_params(ref):
        assert torch.equal(t, want[n].detach()), n
