"""Stopping a run from outside: SIGTERM (what torchrun, Slurm and Kubernetes send) and SIGINT save
the last finished step and print one line with the resume command; SIGKILL leaves no process
behind (the forked reward worker, and under torchrun every rank). Real processes, 1 and 2 ranks,
with the user's reward function named on the command line (``rewards=module:function``)."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["max_steps=400", "prompts_per_step=4", "group_size=4", "max_new_tokens=4", "sft_steps=0",
        "minibatches=2", "plot=false", "export_hf=false", "tensorboard=false", "cpu_threads=1",
        "rewards=pidrew:slow"]

REWARD = '''
import os, time
from pathlib import Path

def slow(prompts, completions, **_):
    d = Path(os.environ["PID_DIR"])
    (d / f"{os.getpid()}").write_text("worker")   # the reward worker
    (d / f"{os.getppid()}").write_text("rank")    # the trainer process (a rank) that forked it
    time.sleep(0.2)
    return [len(c) % 3 / 2 for c in completions]
'''


def _alive(pid: int, cwd: Path) -> bool:
    """Whether this test's process ``pid`` still runs (a process of another program that got the
    same pid since, on a busy machine, does not count: ours run in the test's folder)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
        here = os.readlink(f"/proc/{pid}/cwd") == str(cwd)
    except (FileNotFoundError, PermissionError, ProcessLookupError):
        return False
    return here and "\nState:\tZ" not in state  # a zombie has ended (only its exit status is left)


def _start(tmp_path: Path, out: Path, nproc: int, extra=()):
    (tmp_path / "pidrew.py").write_text(REWARD)
    pids = tmp_path / f"pids_{out.name}"
    pids.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), PID_DIR=str(pids), OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "opo_train"]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={port}", "--master_addr=127.0.0.1", "-m", "opo_train"]
    p = subprocess.Popen([*cmd, *ARGS, f"output_dir={out}", *extra], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return p, pids


def _ready(p, pids: Path, out: Path, nproc: int) -> list[int]:
    """Wait until every rank has a reward worker and a step is done; the pids seen."""
    t0 = time.time()
    while time.time() - t0 < 240 and p.poll() is None:
        kinds = [f.read_text() for f in pids.iterdir()]
        if kinds.count("worker") >= nproc and kinds.count("rank") >= nproc and \
                (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip():
            break
        time.sleep(0.1)
    assert p.poll() is None, p.communicate()[0][-3000:]
    return [int(f.name) for f in pids.iterdir()]


def _gone_within(pids, cwd: Path, seconds: float) -> list[int]:
    t0 = time.time()
    while time.time() - t0 < seconds:
        left = [x for x in pids if _alive(x, cwd)]
        if not left:
            return []
        time.sleep(0.1)
    return [x for x in pids if _alive(x, cwd)]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_saves_and_hints_then_sigkill_leaves_nothing(tmp_path, nproc):
    out, out2 = tmp_path / "run", tmp_path / "run2"
    p, pid_dir = _start(tmp_path, out, nproc)
    p2, pid_dir2 = _start(tmp_path, out2, nproc)  # to be killed with -9 (both start together)
    pids = _ready(p, pid_dir, out, nproc)
    p.send_signal(signal.SIGTERM)
    log, _ = p.communicate(timeout=120)
    assert p.returncode != 0, log[-3000:]
    # No traceback of the trainer's (torchrun's agent prints its own on SIGTERM: not ours).
    assert "opo_train/" not in log and ("Traceback" not in log or nproc > 1), log[-3000:]
    lines = [x for x in log.splitlines() if x.startswith("opo-train: interrupted")]
    assert len(lines) == 1, log[-3000:]
    done = [int(x.split()[1].split("/")[0]) for x in log.splitlines() if x.startswith("step ")]
    saved = sorted(x.name for x in (out / "checkpoints").iterdir() if (x / "COMPLETE").exists())
    assert saved[-1] == f"step_{max(done):06d}", (saved, done)  # the last finished step
    assert saved[-1] in lines[0] and "resume=true" in lines[0] and "config.yaml" in lines[0]
    assert _gone_within(pids, tmp_path, 5.0) == [], "processes left behind after SIGTERM"

    # kill -9 leaves nothing behind either (the in-process tests resume from the printed config).
    cmd = lines[0].split("resume with: ", 1)[1].split()
    assert cmd[cmd.index("--config") + 1] == str(out / "config.yaml") and cmd[-1] == "resume=true"
    assert ("torchrun" in cmd) == (nproc > 1)
    pids = _ready(p2, pid_dir2, out2, nproc)
    os.kill(p2.pid, signal.SIGKILL)
    p2.wait()
    assert _gone_within(pids, tmp_path, 5.0) == [], "processes left behind after SIGKILL"
