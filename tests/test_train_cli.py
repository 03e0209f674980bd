"""The command line: bad configurations fail with one line naming the key, exit code 2.
In-process through ``opo_train.__main__.main`` (what ``opo-train`` runs),
plus one real subprocess."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opo_train.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("key,args", [
    ("model", ["model=/nonexistent"]),
    ("device", ["device=cuda"]),
    ("engine", ["engine=vllm"]),
    ("rewards", ["rewards=[foo]"]),
    ("model_overrides", ["model_overrides.vocab_sizee=3"]),
    ("bad.yaml", None),
    ("alpah", ["alpah=0.3"]),
    ("kernel_backend", ["kernel_backend=nope"]),
])
def test_bad_configurations_fail_in_one_line_with_exit_code_2(tmp_path, capfd, key, args):
    if args is None:
        bad = tmp_path / "bad.yaml"
        bad.write_text("alpha: [0.4\nmu: 1\n")
        args = ["--config", str(bad)]
    rc = main(["max_steps=1", "sft_steps=0", f"output_dir={tmp_path / 'out'}", *args])
    out, err = capfd.readouterr()
    lines = [x for x in (out + err).splitlines() if x.strip()]
    assert rc == 2, out + err
    assert len(lines) == 1 and lines[0].startswith("opo-train: error:") and key in lines[0], lines
    assert not (tmp_path / "out").exists()  # nothing was written


def test_unusable_kernel_backend_from_the_real_command(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TRITON_INTERPRET")}
    p = subprocess.run([sys.executable, "-m", "opo_train", "max_steps=1", "sft_steps=0",
                        f"output_dir={tmp_path / 'out'}", "kernel_backend=triton"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    lines = [x for x in (p.stdout + p.stderr).splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stdout + p.stderr
    assert "'kernel_backend'" in lines[0] and "TRITON_INTERPRET" in lines[0]


def test_console_shows_every_step_and_validation_without_third_party_noise(tmp_path):
    """The toy config's console prints a line per step and per validation, and
    nothing else (no warnings or progress bars of other libraries)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONWARNINGS"] = "default"  # show every warning that is not silenced on purpose
    p = subprocess.run([sys.executable, "-m", "opo_train", "max_steps=3", "sft_steps=2",
                        "sft_batch_size=8", "prompts_per_step=4", "group_size=4", "val_every=2",
                        "val_size=8", "save_every=2", f"output_dir={tmp_path / 'out'}"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    lines = [x for x in out.splitlines() if x.strip()]
    steps = [x for x in lines if x.startswith("step ")]
    assert [x.split()[1] for x in steps] == ["1/3", "2/3", "3/3"], out
    assert any(x.startswith("val ") and "step 2" in x and "accuracy" in x for x in lines), out
    noise = [x for x in lines if not x.startswith(("opo-train:", "[warm start]", "step ", "val ",
                                                    "done in", "saved ", "exported "))]
    assert not noise, noise
