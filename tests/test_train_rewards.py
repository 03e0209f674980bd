"""opo_train rewards, advantages and reward containment, against independent references."""
import math
import time

import pytest
import torch

from opo_train.rewards import RewardRunner, math_reward, toy_reward
from opo_train.train import compute_advantages, overlong_penalty
from opo_train.config import Config


def ref_digit_credit(pred: str, ans: str) -> float:
    pred = pred.strip()
    if not pred or any(c not in "0123456789" for c in pred):
        return 0.0
    a, p = ans[::-1], pred[::-1]
    hits = 0
    for i in range(min(len(a), len(p))):
        hits += a[i] == p[i]
    return hits / max(len(a), len(p))


@pytest.mark.parametrize("pred,ans", [("82", "82"), ("83", "82"), ("182", "82"), ("2", "82"),
                                      ("8 2", "82"), ("x", "5"), ("", "5"), ("105", "105"),
                                      ("100", "105"), (" 7\n", "7"), ("٣", "3")])
def test_toy_reward_matches_reference(pred, ans):
    got = toy_reward(["p"], [pred], answer=[ans])[0]
    assert got == pytest.approx(ref_digit_credit(pred, ans))


def test_math_reward_boxed_and_equivalence():
    comps = ["so the answer is \\boxed{\\frac{1}{2}}.",
             "first \\boxed{3} then \\boxed{4}",
             "\\boxed{0.5}",
             "no box here 4",
             "\\boxed{x^2+2x+1}",
             "\\boxed{\\dfrac{1}{2}}"]
    gold = ["\\frac{1}{2}", "4", "\\frac12", "4", "(x+1)^2", "\\frac{1}{2}"]
    got = math_reward(["q"] * len(comps), comps, answer=gold, timeout=20.0)
    assert got == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]


def ref_advantages(rewards, G, scale):
    out = []
    flat = [r for r in rewards if r is not None]
    batch_std = torch.tensor(flat, dtype=torch.float64).std().item() if len(flat) > 1 else 0.0
    for g in range(len(rewards) // G):
        grp = rewards[g * G:(g + 1) * G]
        vals = [r for r in grp if r is not None]
        if len(vals) < 2:
            out += [0.0] * G
            continue
        m = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
        for r in grp:
            if r is None:
                out.append(0.0)
            elif scale == "group":
                out.append((r - m) / (sd + 1e-6))
            elif scale == "batch":
                out.append((r - m) / (batch_std + 1e-6))
            else:
                out.append(r - m)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("with_none", [False, True])
def test_advantages_match_reference(scale, with_none):
    g = torch.Generator().manual_seed(3)
    G = 4
    rewards = torch.rand(5 * G, generator=g, dtype=torch.float64).tolist()
    rewards[4:8] = [0.5, 0.5, 0.5, 0.5]           # an all-equal group -> 0 advantages
    if with_none:
        rewards[1] = None
        rewards[9] = rewards[10] = rewards[11] = None  # one valid member left -> all 0
    got = compute_advantages(rewards, G, scale)
    ref = ref_advantages(rewards, G, scale)
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)  # group_advantages is fp32


def test_overlong_penalty():
    cfg = Config(max_new_tokens=20, overlong_buffer=4, overlong_penalty=1.0)
    assert [overlong_penalty(n, cfg) for n in (10, 16, 17, 18, 20)] == \
        pytest.approx([0.0, 0.0, -0.25, -0.5, -1.0])


def test_runner_contains_raising_hanging_and_malformed(caplog):
    def good(prompts, completions, **_):
        return [1.0] * len(prompts)

    def boom(prompts, completions, **_):
        raise RuntimeError("reward server down")

    def hang(prompts, completions, **_):
        time.sleep(30)

    def short(prompts, completions, **_):
        return [1.0]

    def partial(prompts, completions, **_):
        return [0.5, None, float("nan")]

    p, c = ["a", "b", "c"], ["x", "y", "z"]
    r = RewardRunner([good, boom], timeout=5.0)
    with caplog.at_level("WARNING", logger="opo_train"):
        assert r(p, c, {}) == [None, None, None]
    assert r.errors == 1 and "reward server down" in caplog.text
    r = RewardRunner(hang, timeout=0.3)
    t0 = time.time()
    assert r(p, c, {}) == [None, None, None]
    assert r.timeouts == 1 and time.time() - t0 < 5
    r = RewardRunner(short, timeout=5.0)
    assert r(p, c, {}) == [None] * 3 and r.errors == 1
    r = RewardRunner([good, partial], weights=[1.0, 2.0], timeout=5.0)
    assert r(p, c, {}) == [2.0, None, None] and r.errors == 0
    with pytest.raises(TypeError, match="reward_fns"):
        RewardRunner([good, 3])
