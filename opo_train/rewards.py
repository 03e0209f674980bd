"""Reward functions and their containment.

A reward function is ``f(prompts, completions, **columns) -> list[float | None]``: one number per
completion (``None`` = no reward; the sample is left out of the update). ``columns`` are the
dataset's other fields, one list per key, aligned with ``prompts`` (e.g. ``answer=[...]``).

:class:`RewardRunner` runs user functions so that one that raises, hangs or returns garbage only
costs that batch's rewards (``None``), is counted, and is logged; the run goes on.

This module imports no torch so that the math-verify worker processes start quickly.
"""
from __future__ import annotations

import logging
import math
import multiprocessing as mp
import threading
import traceback

from .data import last_boxed

log = logging.getLogger("opo_train")


# ----------------------------------------------------------------------------------------------
# Toy reward: partial credit per digit
# ----------------------------------------------------------------------------------------------

def toy_reward(prompts, completions, answer, **_) -> list[float]:
    """Digits of the completion compared with the answer, right-aligned.

    ``reward = (#positions where the digits agree) / max(len(pred), len(answer))``; anything that
    is not a bare number (after stripping whitespace) scores 0. Exact answer = 1.0.
    """
    out = []
    for comp, ans in zip(completions, answer):
        pred = comp.strip()
        if not pred.isdigit() or not pred.isascii():
            out.append(0.0)
            continue
        hits = sum(p == a for p, a in zip(reversed(pred), reversed(ans)))
        out.append(hits / max(len(pred), len(ans)))
    return out


# ----------------------------------------------------------------------------------------------
# Math reward: math-verify on the last \boxed{}, each answer under a timeout in a worker process
# ----------------------------------------------------------------------------------------------

def _normalize(s: str) -> str:
    s = s.replace(" ", "").replace("\\!", "").replace("\\left", "").replace("\\right", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac").replace("^\\circ", "").replace("$", "")
    return s.rstrip(".")


def _verify(gold: str, pred: str) -> float:
    """Runs in a worker process: math-verify equivalence of two boxed answers."""
    from math_verify import parse, verify
    g = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    p = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
    return 1.0 if (g and p and verify(g, p, timeout_seconds=None)) else 0.0


class _VerifyPool:
    """One spawned worker; a call that runs past its timeout kills and replaces the worker."""

    def __init__(self):
        self.pool = None

    def __call__(self, gold: str, pred: str, timeout: float) -> float | None:
        if self.pool is None:
            self.pool = mp.get_context("spawn").Pool(1)
        res = self.pool.apply_async(_verify, (gold, pred))
        try:
            return res.get(timeout)
        except mp.TimeoutError:
            self.pool.terminate()
            self.pool = None
            log.warning("math reward: math-verify timed out after %.1fs on %r", timeout, pred[:80])
            return 0.0
        except Exception as e:  # a parse failure is a wrong answer, not a crash
            log.debug("math reward: math-verify failed on %r: %s", pred[:80], e)
            return 0.0


_POOL = _VerifyPool()


def math_reward(prompts, completions, answer, *, timeout: float = 5.0, **_) -> list[float]:
    """1.0 when the last ``\\boxed{}`` of the completion equals the gold answer, else 0.0.

    A normalized string match short-cuts; otherwise math-verify decides (symbolic equivalence),
    in a worker process with ``timeout`` seconds per answer (a hang scores 0).
    """
    out = []
    for comp, gold in zip(completions, answer):
        pred = last_boxed(comp)
        if pred is None:
            out.append(0.0)
        elif _normalize(pred) == _normalize(str(gold)):
            out.append(1.0)
        else:
            out.append(_POOL(str(gold), pred, timeout))
    return out


REWARDS = {"toy": toy_reward, "math": math_reward}


def resolve_rewards(names, task: str, math_timeout: float = 5.0):
    """Config names -> callables (``auto`` = the task's own reward)."""
    fns = []
    for n in names:
        key = task if n == "auto" else n
        if key not in REWARDS:
            raise ValueError(f"config key 'rewards': unknown reward {n!r}; known: {sorted(REWARDS)}")
        fn = REWARDS[key]
        if fn is math_reward:
            def fn(prompts, completions, answer, _t=math_timeout, **kw):
                return math_reward(prompts, completions, answer, timeout=_t, **kw)
            fn.__name__ = "math_reward"
        fns.append(fn)
    return fns


# ----------------------------------------------------------------------------------------------
# Containment
# ----------------------------------------------------------------------------------------------

class RewardRunner:
    """Calls each reward function on a batch under a timeout and combines them.

    ``errors`` / ``timeouts`` count the calls that raised (or returned a malformed list) and the
    calls that ran past ``timeout`` seconds. A hanging call is abandoned in a daemon thread (Python
    cannot kill a thread); its rewards are None.
    """

    def __init__(self, fns, weights=None, timeout: float = 30.0):
        if callable(fns):
            fns = [fns]
        if not fns or not all(callable(f) for f in fns):
            raise TypeError(f"reward_fns must be a callable or a list of callables, got {fns!r}")
        self.fns = list(fns)
        self.weights = list(weights) if weights else [1.0] * len(self.fns)
        if len(self.weights) != len(self.fns):
            raise ValueError(f"reward weights: need {len(self.fns)}, got {len(self.weights)}")
        self.timeout = timeout
        self.errors = 0
        self.timeouts = 0

    def _call(self, fn, prompts, completions, columns):
        name = getattr(fn, "__name__", repr(fn))
        box: dict = {}

        def target():
            try:
                box["out"] = fn(prompts, completions, **columns)
            except BaseException as e:  # noqa: BLE001 - any failure of user code is contained
                box["err"] = e
                box["tb"] = traceback.format_exc(limit=3)

        t = threading.Thread(target=target, daemon=True, name=f"reward:{name}")
        t.start()
        t.join(self.timeout)
        n = len(prompts)
        if t.is_alive():
            self.timeouts += 1
            log.warning("reward %s: no answer after %.1fs; its rewards for this batch are None "
                        "(timeouts so far: %d)", name, self.timeout, self.timeouts)
            return [None] * n
        if "err" in box:
            self.errors += 1
            log.warning("reward %s raised %s: %s; its rewards for this batch are None "
                        "(errors so far: %d)\n%s", name, type(box["err"]).__name__, box["err"],
                        self.errors, box["tb"])
            return [None] * n
        out = box.get("out")
        if not isinstance(out, (list, tuple)) or len(out) != n:
            self.errors += 1
            log.warning("reward %s returned %s of length %s, expected a list of %d; counted as an "
                        "error (errors so far: %d)", name, type(out).__name__,
                        len(out) if hasattr(out, "__len__") else "?", n, self.errors)
            return [None] * n
        clean = []
        for v in out:
            if isinstance(v, bool):
                v = float(v)
            if v is None or not isinstance(v, (int, float)) or not math.isfinite(v):
                clean.append(None)
            else:
                clean.append(float(v))
        return clean

    def __call__(self, prompts: list[str], completions: list[str], columns: dict) -> list[float | None]:
        total: list[float | None] = [0.0] * len(prompts)
        for fn, w in zip(self.fns, self.weights):
            part = self._call(fn, prompts, completions, columns)
            total = [None if (a is None or b is None) else a + w * b for a, b in zip(total, part)]
        return total
