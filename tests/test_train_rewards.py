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
        assert r(p, c, {}) == [1.0, 1.0, 1.0]  # one failing function voids only its own part
    assert r.errors == 1 and "reward server down" in caplog.text
    r = RewardRunner(hang, timeout=0.3)
    t0 = time.time()
    assert r(p, c, {}) == [None, None, None]
    assert r.timeouts == 1 and time.time() - t0 < 5
    r = RewardRunner(short, timeout=5.0)
    assert r(p, c, {}) == [None] * 3 and r.errors == 1
    r = RewardRunner([good, partial], weights=[1.0, 2.0], timeout=5.0)
    # TRL: weighted sum over the functions that gave a number (None / NaN skipped)
    assert r(p, c, {}) == [2.0, 1.0, 1.0] and r.errors == 0 and r.invalid == 1
    r = RewardRunner([partial], timeout=5.0)
    assert r(p, c, {}) == [0.5, None, None]
    with pytest.raises(TypeError, match="reward_fns"):
        RewardRunner([good, 3])


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_runner_accepts_any_numeric_type(isolation, caplog):
    import numpy as np

    def np_scalars(prompts, completions, **_):
        return [np.float32(0.25), np.int64(1), torch.tensor(0.5), np.float64(2.0)]

    def arrays(prompts, completions, **_):
        return np.array([1, 2, 3, 4], dtype=np.int32)

    def tensor(prompts, completions, **_):
        return torch.tensor([0.5, 0.25, 1.0, 0.0])

    def one_elem(prompts, completions, **_):
        return [torch.tensor([1.0]), np.array(2.0), True, 3]

    p, c = ["a"] * 4, ["x"] * 4
    with caplog.at_level("WARNING", logger="opo_train"):
        for fn, want in [(np_scalars, [0.25, 1.0, 0.5, 2.0]), (arrays, [1.0, 2.0, 3.0, 4.0]),
                         (tensor, [0.5, 0.25, 1.0, 0.0]), (one_elem, [1.0, 2.0, 1.0, 3.0])]:
            r = RewardRunner(fn, timeout=20.0, isolation=isolation)
            got = r(p, c, {})
            r.close()
            assert got == pytest.approx(want) and all(type(v) is float for v in got), fn.__name__
            assert (r.errors, r.invalid, r.timeouts) == (0, 0, 0), fn.__name__
    assert "not finite numbers" not in caplog.text


def test_runner_counts_and_warns_on_values_that_are_not_numbers(caplog):
    def odd(prompts, completions, **_):
        return ["0.5", float("nan"), None, float("inf"), [1.0], 1]

    r = RewardRunner(odd, timeout=20.0)
    with caplog.at_level("WARNING", logger="opo_train"):
        got = r(["a"] * 6, ["x"] * 6, {})
    r.close()
    assert got == [None, None, None, None, None, 1.0]
    assert r.invalid == 4 and r.errors == 0  # None is "no reward", not invalid
    assert "'0.5'" in caplog.text and "str" in caplog.text


def test_trl_style_reward_functions_get_keywords_and_completion_ids():
    seen = {}

    def trl_style(completions, completion_ids, **kwargs):  # a TRL reward function
        seen.update(kwargs, ids=completion_ids)
        return [float(len(i)) for i in completion_ids]

    r = RewardRunner(trl_style, timeout=20.0, isolation="thread")
    got = r(["p1", "p2"], ["a", "bb"], {"answer": ["1", "2"]}, completion_ids=[[5], [6, 7]])
    assert got == [1.0, 2.0] and r.errors == 0
    assert seen["prompts"] == ["p1", "p2"] and seen["answer"] == ["1", "2"]

    def positional(p, c, answer):  # no completion_ids parameter: not passed
        return [float(x == a) for x, a in zip(c, answer)]

    r = RewardRunner(positional, timeout=20.0, isolation="thread")
    assert r(["p"], ["1"], {"answer": ["1"]}, completion_ids=[[3]]) == [1.0]


def test_cpu_bound_hang_does_not_slow_the_trainer():
    def spin(prompts, completions, **_):
        while True:  # holds the interpreter lock of whatever thread runs it
            pass

    def sleepy_loop():
        t0 = time.perf_counter()
        for _ in range(100):  # each sleep gives the GIL away and must get it back
            time.sleep(0.001)
        return time.perf_counter() - t0

    base = sleepy_loop()
    r = RewardRunner(spin, timeout=0.5)  # default isolation: a worker process
    t0 = time.time()
    assert r(["a"], ["b"], {}) == [None] and r.timeouts == 1
    assert time.time() - t0 < 5
    after = sleepy_loop()
    r.close()
    import threading
    assert not [t for t in threading.enumerate() if t.name.startswith("reward")]
    # A spinning thread would add up to the 5 ms switch interval to every GIL hand-back.
    assert after < max(3 * base, base + 0.15), (base, after)


def test_math_reward_timeouts_do_not_void_the_batch():
    from opo_train.rewards import resolve_rewards
    fn, = resolve_rewards(["math"], "math", math_timeout=1.0)
    comps = ["\\boxed{9^{9^{9}}}", "\\boxed{0.5}", "\\boxed{3}", "\\boxed{x^2+2x+1}"]
    gold = ["2", "\\frac12", "4", "(x+1)^2"]
    # The runner's own timeout is shorter than the math reward needs: its budget is per answer.
    r = RewardRunner(fn, timeout=0.5)
    t0 = time.time()
    got = r(["q"] * 4, comps, {"answer": gold})
    r.close()
    assert got == [0.0, 1.0, 0.0, 1.0]  # the pathological answer scores 0, the others count
    assert r.timeouts == 0 and r.errors == 0 and time.time() - t0 < 30


def test_math_reward_from_a_script_without_main_guard(tmp_path):
    """No ``if __name__ == "__main__":`` in the user's script: the math-verify worker must not
    re-run it, and equivalent answers must score 1."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "user_script.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "print('SCRIPT BODY RAN', flush=True)\n"
        "from opo_train.rewards import math_reward\n"
        "t0 = time.time()\n"
        "r = math_reward(['q'] * 3, ['\\\\boxed{0.5}', '\\\\boxed{x^2+2x+1}', '\\\\boxed{7}'],\n"
        "                answer=['\\\\frac12', '(x+1)^2', '8'], timeout=20.0)\n"
        "print('RESULT', r, round(time.time() - t0, 1), flush=True)\n")
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("SCRIPT BODY RAN") == 1, p.stdout
    assert "RESULT [1.0, 1.0, 0.0]" in p.stdout, p.stdout
