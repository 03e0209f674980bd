"""Every fenced code block of README.md and docs/*.md runs here.

- ``python`` blocks run, each in its own process, in a temporary directory in which
  ``opo_train`` links to the package's folder (so the shipped assets' relative paths resolve),
  after the document's setup below (``SETUP``): the tiny tensors and objects a block uses without
  building them (``hidden``, ``lm_head``, a one-process group, ...), so that the blocks stay
  short. The trainer's examples run with ``SHORT_RUN`` appended to every ``load_config``
  (a couple of steps instead of hundreds): the API, the reward protocol and the data format are
  what they exercise.
- ``bash`` blocks, command by command: ``opo-train`` / ``python -m opo_train`` / ``torchrun ...
  -m opo_train`` with ``--help`` or ``--list-configs`` run; with a configuration, the
  configuration is loaded and checked (the command's own parsing and validation, everything it
  does before the model loads; no training); ``python -m bench ...`` has its arguments parsed;
  ``pytest FILE`` names a file that exists. Any other command needs a skip marker.
- ``yaml`` blocks are configuration files: loaded with ``load_config``.
- ``text`` blocks (sample output, file trees) are not code and do not run.
- A block right after ``<!-- doc-test: skip: REASON -->`` does not run; ``SKIPPED`` lists those
  blocks (document, first line), so that the list stays short and reviewed.
- The README's TRL and verl blocks run in the integrations' tests, with more assertions
  (``RUN_ELSEWHERE``).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGS = ("python", "bash", "yaml", "text")
SKIP_RE = re.compile(r"<!--\s*doc-test:\s*skip:\s*(.+?)\s*-->")

# The skip-marked blocks: (document, first line of the block).
SKIPPED = {
    ("README.md", "# the main job: train the embedded toy default (tiny Qwen3-style model, built-in task) on CPU"),
}

# (document, section, language) -> the test that runs those blocks
RUN_ELSEWHERE = {
    ("README.md", "Use with TRL", "python"): "tests/test_integration_trl.py::test_readme_use_with_trl_runs",
    ("README.md", "Use with verl", "python"): "tests/test_integration_verl.py::test_readme_use_with_verl_runs",
    ("README.md", "Use with verl", "bash"):
        "tests/test_integration_verl.py::test_readme_verl_command_is_valid_verl_config",
}

_TENSORS = """
import torch
torch.manual_seed(0)
B, T, H, V, G = 4, 6, 16, 50, 2
hidden = torch.randn(B, T, H, requires_grad=True)
lm_head = torch.nn.Linear(H, V, bias=False)
weight = lm_head.weight
targets = torch.randint(0, V, (B, T))
mask = torch.ones(B, T, dtype=torch.bool)
mask[:, -1] = False
rewards = torch.rand(B)
advantages = torch.randn(B)
with torch.no_grad():
    old = -torch.rand(B, T)
    ref, rollout = old - 0.1, old - 0.05
micro_batches = [slice(0, 2), slice(2, 4)]
options = {}
"""

_GROUP = """
import torch.distributed as dist
from opo_train.distributed import free_port
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
tp_group = dp_group = dist.group.WORLD
start, stop = 0, V
lm_head_shard = lm_head
"""

SHORT_RUN = ["max_steps=1", "sft_steps=2", "val_every=0", "save_every=0", "export_hf=false",
             "plot=false", "prompts_per_step=2", "group_size=2", "minibatches=1"]

_TRAINER = f"""
import opo_train
_load_config = opo_train.load_config
opo_train.load_config = lambda path=None, overrides=None: _load_config(
    path, list(overrides or []) + {SHORT_RUN!r})

def correct(prompts, completions, answer, **columns):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]

def format_ok(prompts, completions, **columns):
    return [float(c.strip().isdigit()) for c in completions]

rows = [{{"prompt": f"{{s}}>", "answer": s[::-1]}} for s in ("12", "345", "6789", "50")]
"""

SETUP = {"README.md": _TENSORS, "contract.md": _TENSORS, "trainer.md": _TRAINER}


def _blocks():
    """(document, line, language, source, skip reason or None) of every fenced block."""
    out = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        i, section = 0, ""
        while i < len(lines):
            m = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
            if not m:
                section = lines[i][3:].strip() if lines[i].startswith("## ") else section
                i += 1
                continue
            indent, lang, start = m.group(1), m.group(2), i
            j = i + 1
            while not re.match(rf"^{indent}```\s*$", lines[j]):
                j += 1
            src = "\n".join(line[len(indent):] for line in lines[start + 1:j])
            prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            skip = SKIP_RE.search(prev)
            elsewhere = RUN_ELSEWHERE.get((doc.name, section, lang))
            reason = skip.group(1) if skip else (f"runs in {elsewhere}" if elsewhere else None)
            out.append((doc.name, start + 1, lang, src, reason))
            i = j + 1
    return out


BLOCKS = _blocks()


def test_every_block_names_a_language_and_the_skip_list_is_reviewed():
    bad = [f"{d}:{n} ```{lang}" for d, n, lang, _, _ in BLOCKS if lang not in LANGS]
    assert not bad, f"fenced blocks must be one of {LANGS}: {bad}"
    marked = {(d, src.splitlines()[0]) for d, _, _, src, skip in BLOCKS
              if skip and not skip.startswith("runs in ")}
    assert marked == SKIPPED, "the skip-marked blocks changed: review SKIPPED"
    for (doc, section, lang), test in RUN_ELSEWHERE.items():
        assert any(b[0] == doc and b[2] == lang and b[4] == f"runs in {test}" for b in BLOCKS), \
            (doc, section, lang)
        path, name = test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), test


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def _run(args, cwd, timeout=600, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPO_LOG_LEVEL": "ERROR", **(env or {})}
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args[:3]} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "opo_train").symlink_to(ROOT / "opo_train")
    return tmp_path


def _params(lang):
    return [pytest.param(b, id=f"{b[0]}:{b[1]}",
                         marks=[pytest.mark.skip(reason=b[4] if b[4].startswith("runs in ")
                                                  else f"doc-test: skip: {b[4]}")] if b[4] else [])
            for b in BLOCKS if b[2] == lang]


@pytest.mark.parametrize("block", _params("python"))
def test_python_block(block, workdir):
    doc, line, _, src, _ = block
    setup = SETUP.get(doc, "")
    if "tp_group" in src:
        setup += _GROUP
    (workdir / "block.py").write_text(f"{setup}\n# ---- {doc}:{line}\n{src}\n")
    _run([sys.executable, "block.py"], workdir)


def _commands(src):
    """The commands of a shell block: continuation lines joined, comments dropped."""
    text = src.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines()
            if shlex.split(line, comments=True)]


def _opo_train_args(cmd):
    """The arguments of an opo-train command line (None if it is not one)."""
    if cmd[0] == "opo-train":
        return cmd[1:]
    if "-m" in cmd and cmd[0] in ("python", "python3", "torchrun"):
        k = cmd.index("-m")
        if cmd[k + 1] == "opo_train":
            return cmd[k + 2:]
    return None


def _check_command(cmd, workdir):
    env = {k: v for k, v in (c.split("=", 1) for c in cmd if re.match(r"^[A-Z_]+=", c))}
    cmd = cmd[len(env):]
    args = _opo_train_args(cmd)
    if args is not None:
        if "--help" in args or "--list-configs" in args:
            _run([sys.executable, "-m", "opo_train", *args], workdir)
            return
        from opo_train.config import load_config
        config = args[args.index("--config") + 1] if "--config" in args else None
        overrides = [a for i, a in enumerate(args) if "=" in a and not a.startswith("--")
                     and (i == 0 or args[i - 1] != "--config")]
        load_config(config, overrides)
        return
    if cmd[:3] in (["python", "-m", "bench"], ["python3", "-m", "bench"]):
        from bench.__main__ import parse_args
        parse_args(cmd[3:])
        return
    if cmd[0] == "pytest":
        assert (ROOT / cmd[1]).is_file(), cmd
        return
    pytest.fail(f"no check for the command {shlex.join(cmd)!r}: mark its block "
                "<!-- doc-test: skip: REASON --> or teach tests/test_docs.py to check it")


@pytest.mark.parametrize("block", _params("bash"))
def test_shell_block(block, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    for cmd in _commands(block[3]):
        _check_command(cmd, workdir)


@pytest.mark.parametrize("block", _params("yaml"))
def test_yaml_block(block, workdir):
    from opo_train.config import load_config
    (workdir / "run.yaml").write_text(block[3] + "\n")
    load_config(str(workdir / "run.yaml"))
