"""tensor_parallel_size: the loss head's vocabulary split over the ranks of a (dp, tp) mesh.

The numerics (4 processes as 2 x 2, and 2 as 1 x 2, against 1 process) are compared in
tests/test_train_dist.py with its 2-vs-1 machinery; here: the configuration's rules, and a whole
run whose checkpoints move between a single process and a split head in both directions.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opo_train.__main__ import main
from opo_train.distributed import free_port
from test_train_dist import _assert_ran

ROOT = Path(__file__).resolve().parents[1]


def _one_line(capfd) -> str:
    out, err = capfd.readouterr()
    lines = [x for x in (out + err).splitlines() if x.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_tensor_parallel_configurations_are_reported_together(tmp_path, capfd):
    # one process: 100 does not divide it, and 100 shards of the tiny model's 128-token
    # vocabulary (2 rows each) leave ranks without rows; a tied head, the naive loss and
    # fsdp=false cannot take a split head
    rc = main(["max_steps=1", "sft_steps=0", f"output_dir={tmp_path / 'out'}",
               "tensor_parallel_size=100", "loss_impl=naive", "fsdp=false",
               "model_overrides.tie_word_embeddings=true"])
    line = _one_line(capfd)
    assert rc == 2 and line.startswith("opo-train: error:")
    for what in ("'loss_impl'", "'fsdp'", "number of processes (1", "128-token vocabulary",
                 "tie_word_embeddings"):
        assert what in line, (what, line)
    assert line.count("'tensor_parallel_size'") == 3, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "-2"])
def test_tensor_parallel_size_below_one_is_refused(tmp_path, capfd, value):
    rc = main(["max_steps=1", f"output_dir={tmp_path / 'out'}", f"tensor_parallel_size={value}"])
    line = _one_line(capfd)
    assert rc == 2 and "'tensor_parallel_size': must be >= 1" in line and value in line


def test_trl_per_device_batch_counts_data_parallel_processes(monkeypatch):
    """TRL's per_device_train_batch_size B: the completions of a tensor-parallel group are the
    same, so prompts_per_step = B x (processes / k) x minibatches / group_size."""
    from opo_train.config import load_config
    monkeypatch.setenv("WORLD_SIZE", "4")
    base = ["per_device_train_batch_size=8", "group_size=4", "minibatches=2", "max_steps=1"]
    assert load_config(None, base).prompts_per_step == 8 * 4 * 2 // 4
    assert load_config(None, base + ["tensor_parallel_size=2"]).prompts_per_step == 8 * 2 * 2 // 4


def _hf_weights(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
def test_checkpoints_move_between_one_process_and_a_split_head(tmp_path):
    """One process warm-starts and saves step 1; 4 processes (2 x 2, the head split over 2 ranks)
    resume it, train step 2 and save it with the HF model; read back in one process, that
    checkpoint is the same model bit for bit, and it holds the warm-started weights."""
    out = tmp_path / "run"
    # lr 1e-9: the RL steps barely move the weights, so what the split run holds can be
    # compared with what the single process saved (the warm start moves them ~1e-4)
    lr = 1e-9
    args = ["-m", "opo_train", "sft_steps=2", "sft_batch_size=8", "prompts_per_step=4",
            "group_size=4", "max_new_tokens=4", "save_every=1", "val_every=2", "val_size=8",
            "plot=false", "report_to=none", f"lr={lr}", f"output_dir={out}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, *args, "max_steps=1", "export_hf=false"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4",
                        f"--master_port={free_port()}", "--master_addr=127.0.0.1", *args,
                        "max_steps=2", "tensor_parallel_size=2", "resume=true"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    _assert_ran(r)
    assert "resumed from" in r.stdout and "tensor_parallel_size=2" in r.stdout, r.stdout[-3000:]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_000001", "step_000002"], ckpts  # nothing refused as corrupt
    assert sorted(p.name for p in (out / "checkpoints" / "step_000002").glob("rng_rank*.pt")) == \
        [f"rng_rank{r}.pt" for r in range(4)]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2] and "val_accuracy" in rows[1]
    from opo_train.config import load_config
    from opo_train.export import export
    from opo_train.model import build_hf_model
    # split -> one process: the split run's own HF export (gathered from the shards) and its
    # checkpoint read back in one process: the same tensors, bit for bit
    split = _hf_weights(out / "hf_model")
    two = _hf_weights(export(out / "checkpoints" / "step_000002", tmp_path / "two"))
    assert split.keys() == two.keys() and split["lm_head.weight"].shape == (128, 192)
    for k in split:
        assert torch.equal(split[k], two[k]), k
    # one process -> split: the split run started from the single process's step 1, not from a
    # fresh init. One AdamW step moves a weight by at most ~lr (|m̂| / √v̂ ≤ 1 for these betas);
    # 100 lr leaves room for the moments carried over, far below what the warm start moved.
    one = _hf_weights(export(out / "checkpoints" / "step_000001", tmp_path / "one"))
    torch.manual_seed(0)
    init = dict(build_hf_model(load_config(None, ["max_steps=1"]), torch.device("cpu")).named_parameters())
    for k in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"):
        assert float((one[k] - init[k].detach()).abs().max()) > 1e4 * lr, k  # warm-started
        assert float((split[k] - one[k]).abs().max()) <= 100 * lr, k
