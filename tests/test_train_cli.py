"""The command line: bad configurations fail with one line naming the key, exit code 2
(issue 11, item 6). In-process through ``opo_train.__main__.main`` (what ``opo-train`` runs),
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
