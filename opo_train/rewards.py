"""Reward functions and their containment.

A reward function is ``f(prompts, completions, **columns) -> list[float | None]``: one number per
completion (``None`` = no reward; the sample is left out of the update). ``columns`` are the
dataset's other fields, one list per key, aligned with ``prompts`` (e.g. ``answer=[...]``).

:class:`RewardRunner` runs user functions so that one that raises, hangs or returns garbage only
costs that batch's rewards (``None``), is counted, and is logged; the run goes on.

This module imports no torch so that the math-verify worker processes start quickly.
"""
from __future__ import annotations

import atexit
import json
import logging
import inspect
import math
import numbers
import select
import subprocess
import sys
import threading
import traceback
from pathlib import Path

from .data import last_boxed
from .errors import ConfigError

log = logging.getLogger("opo_train")


# ----------------------------------------------------------------------------------------------
# Toy reward: partial credit per digit
# ----------------------------------------------------------------------------------------------

def _text(completion) -> str:
    """A completion's text: a string, or TRL's conversational ``[{"role": "assistant",
    "content": ...}]``."""
    if isinstance(completion, (list, tuple)):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return completion if isinstance(completion, str) else str(completion)


def toy_reward(prompts, completions, answer, **_) -> list[float]:
    """Digits of the completion compared with the answer, right-aligned.

    ``reward = (#positions where the digits agree) / max(len(pred), len(answer))``; anything that
    is not a bare number (after stripping whitespace) scores 0. Exact answer = 1.0.
    """
    out = []
    for comp, ans in zip(completions, answer):
        pred = _text(comp).strip()
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


_WORKER = Path(__file__).with_name("_mathverify_worker.py")


def _die_with_parent() -> None:
    """In the math-verify worker before it starts (Linux): die with the process that started it
    (e.g. a reward worker killed at its timeout), even while stuck on an answer."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the worker exits at the end of its stdin
        pass


class _VerifyWorker:
    """math-verify in a separate interpreter (``python _mathverify_worker.py``: it imports
    neither the caller's script nor torch, so a script without an ``if __name__ ==
    "__main__":`` guard is safe). One JSON line per answer each way; an answer that runs past
    its timeout kills the worker (a fresh one starts on the next answer) and scores 0."""

    def __init__(self):
        self.proc = None
        self.timeouts = 0

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-u", str(_WORKER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     bufsize=1, preexec_fn=_die_with_parent)
        if self._readline(120.0) != "ready":  # importing math-verify (sympy) takes a few seconds
            self.close()
            raise RuntimeError("math reward: the math-verify worker did not start "
                               "(is math-verify installed? pip install 'math-verify>=0.7')")

    def _readline(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return line.strip() if line else None

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def __call__(self, gold: str, pred: str, timeout: float) -> float:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps([gold, pred]) + "\n")
        self.proc.stdin.flush()
        line = self._readline(timeout)
        if line is None:
            self.close()
            self.timeouts += 1
            log.warning("math reward: math-verify gave no answer within %.1fs on %r; it scores 0 "
                        "(math-verify timeouts so far: %d)", timeout, pred[:80], self.timeouts)
            return 0.0
        return float(json.loads(line))


_POOL = _VerifyWorker()
atexit.register(_POOL.close)


def math_reward(prompts, completions, answer, *, timeout: float = 5.0, **_) -> list[float]:
    """1.0 when the last ``\\boxed{}`` of the completion equals the gold answer, else 0.0.

    A normalized string match short-cuts; otherwise math-verify decides (symbolic equivalence),
    in a worker process with ``timeout`` seconds per answer (an answer that hangs scores 0; the
    others of the batch are scored as usual).
    """
    out = []
    for comp, gold in zip(completions, answer):
        pred = last_boxed(_text(comp))
        if pred is None:
            out.append(0.0)
        elif _normalize(pred) == _normalize(str(gold)):
            out.append(1.0)
        else:
            out.append(_POOL(str(gold), pred, timeout))
    return out


def _budget(per_answer: float):
    """The most seconds ``math_reward`` may take on n answers (the runner's timeout for it)."""
    return lambda n: 10.0 + n * (per_answer + 0.5)


REWARDS = {"toy": toy_reward, "math": math_reward}


def import_reward(spec: str):
    """``module:function`` (or ``module.function``, or ``path/to/file.py:function``) -> the
    function. The current directory is searched first, as ``python -m`` does."""
    import importlib
    import importlib.util
    import os
    where, sep, name = spec.rpartition(":")
    if not sep:
        where, _, name = spec.rpartition(".")
    if not where or not name:
        raise ConfigError(f"config key 'rewards': {spec!r} is neither a built-in reward "
                          f"({', '.join(sorted(REWARDS))}) nor module:function")
    try:
        if where.endswith(".py"):
            if not Path(where).is_file():
                raise ConfigError(f"config key 'rewards': {spec!r}: no file {where!r}")
            mod_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module: say what it raised, on one line
        raise ConfigError(f"config key 'rewards': importing {where!r} for {spec!r} failed: "
                          f"{type(e).__name__}: {' '.join(str(e).split())}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"config key 'rewards': {where!r} has no function {name!r} (from {spec!r})")
    return fn


def resolve_rewards(names, task: str, math_timeout: float = 5.0):
    """Config names -> callables: ``auto`` (the task's own reward: toy, math), a built-in name,
    or a user's ``module:function``. Every bad name is reported together."""
    fns, errors = [], []
    for n in names:
        key = task if n == "auto" else str(n)
        if n == "auto" and key not in REWARDS:
            errors.append(f"config key 'rewards': task {task!r} has no built-in reward; name your "
                          f"reward function(s): rewards=module:function (several: "
                          f"rewards=[mod:f,mod:g] reward_weights=[1.0,0.5]), or pass reward_fns= "
                          f"to train()")
            continue
        if key not in REWARDS:
            try:
                fns.append(import_reward(key))
            except ConfigError as e:
                errors.append(str(e))
            continue
        fn = REWARDS[key]
        if fn is math_reward:
            def fn(prompts, completions, answer, _t=math_timeout, **kw):
                return math_reward(prompts, completions, answer, timeout=_t, **kw)
            fn.__name__ = "math_reward"
            fn.max_seconds = _budget(math_timeout)
        fns.append(fn)
    if errors:
        raise ConfigError.of(errors)
    return fns


# ----------------------------------------------------------------------------------------------
# Containment
# ----------------------------------------------------------------------------------------------

def _as_number(v):
    """(float or None, invalid?) for one value a reward function returned: any real number
    (Python, NumPy, a 0-d/1-element tensor or array, bool) counts; None is "no reward"; anything
    else (a string, NaN, inf, a list) is invalid."""
    if v is None:
        return None, False
    if isinstance(v, bool):
        return float(v), False
    if not isinstance(v, numbers.Real) and hasattr(v, "item"):  # tensors, NumPy arrays
        try:
            size = v.numel() if callable(getattr(v, "numel", None)) else getattr(v, "size", None)
            if size != 1:
                return None, True
            v = v.item()
        except Exception:  # noqa: BLE001
            return None, True
    if isinstance(v, bool):
        return float(v), False
    if isinstance(v, numbers.Real):
        try:
            x = float(v)
        except Exception:  # noqa: BLE001
            return None, True
        return (x, False) if math.isfinite(x) else (None, True)
    return None, True


def _keyword_call(fn) -> bool:
    """TRL calls ``f(prompts=..., completions=..., completion_ids=..., **columns)``; functions
    written for it (``def f(completions, **kwargs)``) need keywords. Positional otherwise."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    names = list(params)
    return (len(names) > 0 and names[0] != "prompts" and "completions" in params) or \
        (len(names) >= 2 and names[:2] == ["prompts", "completions"])


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _invoke(fn, prompts, completions, columns, completion_ids):
    kw = dict(columns)
    if completion_ids is not None and _accepts(fn, "completion_ids"):
        kw["completion_ids"] = completion_ids
    if _keyword_call(fn):
        return fn(prompts=prompts, completions=completions, **kw)
    return fn(prompts, completions, **kw)


def _outcome(fn, args):
    """Run one call; ("ok", values) or ("error", type, message, traceback)."""
    try:
        out = _invoke(fn, *args)
        if hasattr(out, "tolist") and getattr(out, "ndim", 0) == 1:  # a 1-d array / tensor
            out = out.tolist()
        if isinstance(out, (list, tuple)):
            out = [x if isinstance(x, (int, float, str, type(None))) else _portable(x) for x in out]
        return ("ok", out)
    except BaseException as e:  # noqa: BLE001 - any failure of user code is contained
        return ("error", type(e).__name__, str(e)[:500], traceback.format_exc(limit=3))


def _portable(x):
    """A value that pickles across the process boundary and keeps what _as_number needs."""
    v, bad = _as_number(x)
    return v if not bad else f"<{type(x).__name__}: {str(x)[:40]}>"


def watch_parent(parent: int) -> None:
    """End this process as soon as its parent is gone (``kill -9`` on the trainer
    runs no handler, and the worker may sit in user code that never reads the pipe again)."""
    import os
    import signal
    import time

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def _serve(fns, conn, parent: int) -> None:  # the body of the reward worker process
    import os
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the trainer's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the trainer's handler, copied by fork
    # Die with the trainer: the kernel's parent-death signal, and a watchdog for the case where
    # the parent died before the signal was armed.
    _die_with_parent()
    if os.getppid() != parent:
        os._exit(0)
    watch_parent(parent)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        i, args = msg
        conn.send(_outcome(fns[i], args))


class _ProcessCaller:
    """Reward functions run in a forked worker process: a call that hangs (even in a CPU-bound
    loop that would hold the interpreter lock of a thread) is killed at its timeout and costs the
    trainer nothing; the next call gets a fresh worker. State a function keeps lives in the
    worker (and is lost with it on a timeout)."""

    def __init__(self, fns):
        import multiprocessing as mp
        self.ctx = mp.get_context("fork")
        self.fns = fns
        self.proc = self.conn = None

    def _start(self):
        parent, child = self.ctx.Pipe()
        import os
        self.proc = self.ctx.Process(target=_serve, args=(self.fns, child, os.getpid()), daemon=True,
                                     name="opo-reward-worker")
        self.proc.start()
        child.close()
        self.conn = parent

    def kill(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.join()
            self.conn.close()
            self.proc = self.conn = None

    def __call__(self, i, args, timeout):
        if self.proc is None or not self.proc.is_alive():
            self._start()
        try:
            self.conn.send((i, args))
            if self.conn.poll(timeout):
                return self.conn.recv()
        except (EOFError, OSError, BrokenPipeError) as e:
            self.kill()
            return ("error", "WorkerDied", f"the reward worker process died ({e!r})", "")
        except Exception as e:  # noqa: BLE001 - e.g. arguments that do not pickle
            self.kill()
            return ("error", type(e).__name__, str(e)[:500], "")
        self.kill()
        return ("timeout",)


class _ThreadCaller:
    """Reward functions run in a daemon thread of the trainer's process (``reward_isolation=
    thread``: for functions that need the trainer's process, e.g. a reward model on its GPU).
    A call past its timeout is abandoned; a CPU-bound hang then keeps slowing the trainer."""

    def __init__(self, fns):
        self.fns = fns

    def kill(self):
        pass

    def __call__(self, i, args, timeout):
        box = {}
        t = threading.Thread(target=lambda: box.update(r=_outcome(self.fns[i], args)), daemon=True,
                             name=f"reward:{getattr(self.fns[i], '__name__', i)}")
        t.start()
        t.join(timeout)
        return box.get("r", ("timeout",))


class RewardRunner:
    """Calls each reward function on a batch under a timeout and combines them as TRL's
    GRPOTrainer does: ``reward = Σ_f w_f · r_f`` over the functions that gave a number for the
    sample (None and NaN are skipped, like TRL's ``nansum``). Where no function gave a number,
    TRL counts 0 and warns; here the sample gets None (left out of the update) and a warning.

    A function that raises, runs past ``timeout`` seconds (``fn.max_seconds(n)`` when larger),
    or returns something that is not a list of one value per completion gives None for its whole
    batch and is counted (``errors`` / ``timeouts``); single values that are not numbers (a
    string, NaN, inf) give None for that sample and are counted in ``invalid``. Every one is
    logged as a warning. ``isolation``: "process" (a forked worker, the default on Linux) or
    "thread".
    """

    def __init__(self, fns, weights=None, timeout: float = 30.0, isolation: str = "process"):
        if callable(fns):
            fns = [fns]
        if not fns or not all(callable(f) for f in fns):
            raise TypeError(f"reward_fns must be a callable or a list of callables, got {fns!r}")
        self.fns = list(fns)
        self.names = [getattr(f, "__name__", type(f).__name__) for f in self.fns]
        self.weights = [float(w) for w in weights] if weights else [1.0] * len(self.fns)
        if len(self.weights) != len(self.fns):
            raise ValueError(f"reward weights: need {len(self.fns)}, got {len(self.weights)}")
        if isolation not in ("process", "thread"):
            raise ConfigError(f"config key 'reward_isolation': must be 'process' or 'thread', "
                             f"got {isolation!r}")
        if isolation == "process" and "fork" not in _mp_methods():
            log.warning("reward_isolation=process needs the 'fork' start method, not available "
                        "here: reward functions run in threads")
            isolation = "thread"
        self.isolation = isolation
        self.caller = _ProcessCaller(self.fns) if isolation == "process" else _ThreadCaller(self.fns)
        self.timeout = timeout
        self.errors = 0
        self.timeouts = 0
        self.invalid = 0
        self.last_failure = ""

    def close(self) -> None:
        self.caller.kill()

    def _call(self, i, prompts, completions, columns, completion_ids):
        fn, name, n = self.fns[i], self.names[i], len(prompts)
        budget = self.timeout
        if hasattr(fn, "max_seconds"):
            budget = max(budget, float(fn.max_seconds(n)))
        res = self.caller(i, (list(prompts), list(completions), dict(columns), completion_ids), budget)
        if res[0] == "timeout":
            self.timeouts += 1
            self.last_failure = f"reward {name}: no answer after {budget:.1f}s"
            log.warning("reward %s: no answer after %.1fs; its rewards for this batch are None "
                        "(timeouts so far: %d)", name, budget, self.timeouts)
            return [None] * n
        if res[0] == "error":
            self.errors += 1
            self.last_failure = f"reward {name} raised {res[1]}: {res[2]}"
            log.warning("reward %s raised %s: %s; its rewards for this batch are None "
                        "(errors so far: %d)\n%s", name, res[1], res[2], self.errors, res[3])
            return [None] * n
        out = res[1]
        if not isinstance(out, (list, tuple)) or len(out) != n:
            self.errors += 1
            self.last_failure = (f"reward {name} returned {type(out).__name__} of length "
                                 f"{len(out) if hasattr(out, '__len__') else '?'}, expected a list of {n}")
            log.warning("%s; counted as an error (errors so far: %d)", self.last_failure, self.errors)
            return [None] * n
        clean, bad = [], []
        for v in out:
            x, invalid = _as_number(v)
            clean.append(x)
            if invalid:
                bad.append(v)
        if bad:
            self.invalid += len(bad)
            self.last_failure = f"reward {name} returned values that are not numbers, e.g. {bad[0]!r}"
            log.warning("reward %s returned %d value(s) that are not finite numbers (e.g. %r of "
                        "type %s); they count as no reward (invalid values so far: %d)", name,
                        len(bad), bad[0], type(bad[0]).__name__, self.invalid)
        return clean

    def __call__(self, prompts: list[str], completions: list[str], columns: dict,
                 completion_ids: list[list[int]] | None = None) -> list[float | None]:
        parts = [self._call(i, prompts, completions, columns, completion_ids)
                 for i in range(len(self.fns))]
        self.last_parts = parts  # per function, unweighted (its own metrics)
        total: list[float | None] = []
        for j in range(len(prompts)):
            vals = [w * p[j] for p, w in zip(parts, self.weights) if p[j] is not None]
            total.append(sum(vals) if vals else None)
        none = sum(t is None for t in total)
        if none and len(self.fns) > 1:
            log.warning("%d of %d samples got no reward from any of the %d reward functions; they "
                        "are left out of the update", none, len(total), len(self.fns))
        return total


def _mp_methods():
    import multiprocessing as mp
    return mp.get_all_start_methods()
