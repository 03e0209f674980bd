"""Prompt sources: the built-in toy arithmetic task and MATH-format files.

A prompt source has ``batch(step, n) -> list[dict]``: rows with a ``prompt`` string plus any
columns the rewards read (``answer`` for the toy and math rewards). The rows of a step are a pure
function of ``(seed, step)``, so the data position of a run is its step and resuming needs nothing
else. Finite sources also have ``__len__``.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from .errors import ConfigError

# ----------------------------------------------------------------------------------------------
# Toy tasks: a+b= and digit reversal, partial credit per digit (see rewards.toy_reward)
# ----------------------------------------------------------------------------------------------

SPLITS = {"sft": 0, "val": 1, "train": (2, 3)}
TOY_TASKS = ("add", "reverse")


def _in_split(key: str, split: str) -> bool:
    # Disjoint splits by a hash of the problem, so the warm start never sees an RL prompt.
    h = sum((i + 1) * 7919 * ord(c) for i, c in enumerate(key)) % 4
    want = SPLITS[split]
    return h in want if isinstance(want, tuple) else h == want


class ToyTask:
    """Built-in verifiable tasks with a digit-string answer (scored by ``rewards.toy_reward``).

    ``add``: ``"37+45="`` -> ``"82"`` (operands of 1..digits digits).
    ``reverse``: ``"3817>"`` -> ``"7183"`` (strings of 2..digits+2 digits).
    Problems split 1:1:2 into sft / val / train by a hash, so the splits never share a problem.
    """

    def __init__(self, seed: int = 0, split: str = "train", digits: int = 2, op: str = "add"):
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if op not in TOY_TASKS:
            raise ConfigError(f"config key 'toy_task' must be one of {TOY_TASKS}, got {op!r}")
        self.seed, self.split, self.digits, self.op = seed, split, digits, op

    def _draw(self, rng: random.Random) -> dict:
        while True:
            if self.op == "add":
                hi = 10 ** self.digits - 1
                a, b = rng.randint(0, hi), rng.randint(0, hi)
                row = {"prompt": f"{a}+{b}=", "answer": str(a + b)}
            else:
                n = rng.randint(2, self.digits + 2)
                x = "".join(rng.choice("0123456789") for _ in range(n))
                row = {"prompt": f"{x}>", "answer": x[::-1]}
            if _in_split(row["prompt"], self.split):
                return row

    def batch(self, step: int, n: int) -> list[dict]:
        rng = random.Random(f"{self.seed}/{self.op}/{self.split}/{step}")
        return [self._draw(rng) for _ in range(n)]

    def fixed(self, n: int) -> list[dict]:
        """A fixed set of n problems (the validation set)."""
        return self.batch(-1, n)


ToyAdditionTask = ToyTask  # the name of the default task's class in earlier drafts


# ----------------------------------------------------------------------------------------------
# Finite datasets (MATH jsonl / parquet, or a user's list of rows)
# ----------------------------------------------------------------------------------------------

class ListDataset:
    """Rows in a fixed list; ``batch`` walks a per-epoch shuffled order (seeded)."""

    def __init__(self, rows: list[dict], seed: int = 0, shuffle: bool = True, name: str = "dataset"):
        if not isinstance(rows, (list, tuple)) or not rows:
            raise ConfigError(f"{name}: needs a non-empty list of rows, got {type(rows).__name__} "
                             f"of length {len(rows) if hasattr(rows, '__len__') else '?'}")
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                raise ConfigError(f"{name}: row {i} must be a dict, got {type(r).__name__}")
            if not (isinstance(r.get("prompt"), str) and r["prompt"]) and not is_conversation(r.get("prompt")):
                raise ConfigError(f"{name}: row {i} needs a 'prompt': a non-empty string or a list of "
                                  f"messages ({{'role': ..., 'content': ...}}), got {r.get('prompt')!r}")
        self.rows, self.seed, self.shuffle = list(rows), seed, shuffle
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            idx = list(range(len(self.rows)))
            if self.shuffle:
                random.Random(f"{self.seed}/epoch/{epoch}").shuffle(idx)
            self._orders = {epoch: idx}
        return self._orders[epoch]

    def position(self, step: int, n: int) -> dict:
        start = step * n
        return {"epoch": start // len(self.rows), "offset": start % len(self.rows)}

    def batch(self, step: int, n: int) -> list[dict]:
        out = []
        for k in range(step * n, step * n + n):
            epoch, off = divmod(k, len(self.rows))
            out.append(self.rows[self._order(epoch)[off]])
        return out

    def fixed(self, n: int) -> list[dict]:
        return self.rows[: n or len(self.rows)]


def is_conversation(prompt) -> bool:
    """A conversational prompt: a non-empty list of ``{"role": ..., "content": ...}`` messages."""
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0 and
            all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt))


def as_dataset(obj, seed: int = 0, name: str = "dataset"):
    """Accept a prompt source (``batch(step, n)``: ``ToyTask``, ``ListDataset`` or your own), an
    HF ``datasets.Dataset`` / ``IterableDataset`` (rows read once), or a list of row dicts."""
    mod = type(obj).__module__ or ""
    if mod.startswith("datasets"):  # HF datasets have a .batch() of their own: not a prompt source
        rows = [dict(r) for r in obj]
        return ListDataset(rows, seed=seed, name=name)
    if hasattr(obj, "batch") and not isinstance(obj, (list, tuple)):
        return obj
    return ListDataset(list(obj) if not isinstance(obj, list) else obj, seed=seed, name=name)


def load_hf_rows(path: str, split: str = "train") -> list[dict]:
    """Rows of a local file (json/jsonl/csv/parquet) or a saved dataset directory, read through
    ``datasets`` (nothing is downloaded: a name that is not a local path is refused)."""
    p = Path(path)
    if not path or not p.exists():
        raise ConfigError(f"config key 'train_file'/'val_file': {path!r} is not a local file or "
                          f"directory (nothing is downloaded at run time)")
    if p.is_file() and p.stat().st_size == 0:
        raise ConfigError(f"config key 'train_file'/'val_file': {path!r} is empty (no rows)")
    try:
        import datasets
    except ImportError:
        raise ConfigError("config key 'task': 'hf' needs the datasets package "
                          "(pip install datasets)") from None
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()
                       or (p / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        fmt = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(p.suffix)
        try:
            ds = datasets.load_dataset(fmt, data_files=str(p), split=split) if fmt else \
                datasets.load_dataset(str(p), split=split)
        except Exception as e:  # noqa: BLE001 - the file's problem, said on one line
            raise ConfigError(f"config key 'train_file'/'val_file': {path!r} cannot be read as a "
                              f"dataset: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    rows = [dict(r) for r in ds]
    if not rows:
        raise ConfigError(f"config key 'train_file'/'val_file': {path!r} holds no rows")
    return rows


# ----------------------------------------------------------------------------------------------
# MATH files
# ----------------------------------------------------------------------------------------------

def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced."""
    if not isinstance(text, str):
        return None
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    i = starts[-1]
    depth, j = 1, i
    while j < len(text):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
        j += 1
    return None


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a ``.jsonl`` / ``.json`` / ``.parquet`` file as dicts (errors name the line)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"data file {str(p)!r} does not exist")
    if p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
            return pq.read_table(p).to_pylist()
        except ImportError:
            try:
                import pandas as pd
                return pd.read_parquet(p).to_dict("records")
            except ImportError:
                raise ConfigError(f"{p}: reading parquet needs pyarrow or pandas "
                                 f"(pip install pyarrow)") from None
    if p.suffix == ".json":
        with open(p) as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise ConfigError(f"{p}: a .json data file must hold a list of rows")
        return data
    rows = []
    with open(p) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}: line {n} is not valid JSON ({e.msg})") from None
    return rows


def _level_of(v) -> str:
    if isinstance(v, int):
        return f"Level {v}"
    return str(v).strip()


def load_math(path: str | Path, *, levels=(), fraction: float = 1.0, size: int = 0,
              seed: int = 42, prompt_suffix: str = "") -> list[dict]:
    """MATH-format rows -> prompt rows.

    Each row needs ``problem`` (non-empty str) and ``solution`` (str with a ``\\boxed{}`` answer)
    or ``answer``; ``level`` ("Level 3" or 3) is needed when ``levels`` filters. Output rows:
    ``prompt`` (problem + suffix), ``answer`` (the boxed answer), ``problem``, ``solution``,
    ``level``. A bad row raises ``ValueError`` naming the file and row number.
    """
    want = {_level_of(x) for x in levels}
    out = []
    for i, r in enumerate(read_rows(path)):
        where = f"{path}: row {i}"
        if not isinstance(r, dict):
            raise ConfigError(f"{where}: must be an object, got {type(r).__name__}")
        prob = r.get("problem")
        if not isinstance(prob, str) or not prob.strip():
            raise ConfigError(f"{where}: 'problem' must be a non-empty string, got {prob!r}")
        sol = r.get("solution")
        ans = r.get("answer")
        if ans is None:
            if not isinstance(sol, str):
                raise ConfigError(f"{where}: needs a 'solution' string (or an 'answer'), got {sol!r}")
            ans = last_boxed(sol)
            if ans is None:
                raise ConfigError(f"{where}: 'solution' has no \\boxed{{...}} final answer")
        if want:
            if "level" not in r:
                raise ConfigError(f"{where}: no 'level' field but levels={sorted(want)} was asked")
            if _level_of(r["level"]) not in want:
                continue
        out.append({"prompt": prob + prompt_suffix, "answer": str(ans), "problem": prob,
                    "solution": sol if isinstance(sol, str) else "",
                    "level": _level_of(r.get("level", ""))})
    if not out:
        raise ConfigError(f"{path}: no rows left after filtering by levels={sorted(want)}" if want
                          else f"{path}: holds no rows")
    if fraction < 1.0:
        rng = random.Random(seed)
        keep = max(1, round(len(out) * fraction))
        out = [out[k] for k in sorted(rng.sample(range(len(out)), keep))]
    if size:
        out = out[:size]
    return out
