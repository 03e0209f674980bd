"""A user's own task: own data and reward functions (Python API and command line), every config
problem reported together before the model loads, TRL's key names, DAPO's filter metric, clean
interrupts and honest resumes, the exported chat template, prompt truncation, and what the run
logs (console, per-function rewards, TensorBoard groups, metrics.png). In-process runs of the
tiny model, a few seconds each."""
import errno
import json
import logging
import os
import signal
from pathlib import Path

import pytest

from opo_train import load_config, train
from opo_train.__main__ import main
from opo_train.errors import ConfigError, Interrupted, TrainingStopped

SMALL = ["prompts_per_step=4", "group_size=4", "max_new_tokens=4", "sft_steps=0", "val_every=0",
         "minibatches=2", "lr=1e-3", "plot=false", "tensorboard=false", "export_hf=false"]
ROWS = [{"prompt": f"{i}{i % 7}>", "answer": f"{i % 7}{i}"} for i in range(24)]

REWARDS = '''
def length(prompts, completions, **_):
    return [len(c) / 4 for c in completions]

def digits(prompts, completions, answer, **_):
    return [float(c.strip() == a) + sum(ch.isdigit() for ch in c) / 8 for c, a in zip(completions, answer)]
'''


def _cfg(out, *extra):
    return load_config(None, [*SMALL, f"output_dir={out}", *extra])


def _rows(d: Path, name="metrics.jsonl"):
    return [json.loads(x) for x in (d / name).read_text().splitlines() if x.strip()]


def _one_line(capfd):
    out, err = capfd.readouterr()
    lines = [x for x in (out + err).splitlines() if x.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def _write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- own data and reward functions ------------------------------------------------------------------

def length(prompts, completions, **_):
    return [len(c) / 4 for c in completions]


def digits(prompts, completions, answer, **_):
    return [float(c.strip() == a) + sum(ch.isdigit() for ch in c) / 8 for c, a in zip(completions, answer)]


def test_python_api_takes_several_reward_functions_with_weights(tmp_path):
    out = tmp_path / "api"
    train(_cfg(out, "max_steps=2"), reward_fns=[length, digits], dataset=ROWS, reward_weights=[1.0, 0.5])
    for row in _rows(out):
        # each function's own mean; the combined reward is their weighted sum (no None here)
        combined = row["reward_length_mean"] + 0.5 * row["reward_digits_mean"]
        assert row["reward_mean"] == pytest.approx(combined, rel=1e-12, abs=1e-12)
        assert row["reward_length_std"] is not None and 0.0 <= row["zero_spread_frac"] <= 1.0


def test_command_line_names_reward_functions_of_a_module(tmp_path, monkeypatch, capfd):
    (tmp_path / "myrew.py").write_text(REWARDS)
    data = _write_jsonl(tmp_path / "train.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)
    rc = main([*SMALL, "max_steps=2", "task=hf", f"train_file={data}", f"output_dir={tmp_path / 'cli'}",
               "rewards=myrew:length,myrew:digits", "reward_weights=1.0,0.5"])
    assert rc == 0, capfd.readouterr()
    row = _rows(tmp_path / "cli")[-1]
    assert row["reward_mean"] == pytest.approx(row["reward_length_mean"] + 0.5 * row["reward_digits_mean"],
                                               rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("kind", ["parquet", "saved"])
def test_parquet_and_saved_datasets_load(tmp_path, kind):
    import datasets
    from opo_train.data import load_hf_rows
    ds = datasets.Dataset.from_list(ROWS)
    if kind == "parquet":
        path = tmp_path / "d.parquet"
        ds.to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    assert load_hf_rows(str(path)) == ROWS


# -- every config problem at once, before the model loads; clear one-line errors ---------------------

def test_config_problems_are_reported_together(tmp_path, capfd):
    rc = main(["max_steps=1", f"output_dir={tmp_path / 'out'}", "task=hf", "val_every=2",
               "rewards=[nope]", "sft_steps=3", "chat_template=xx", "model=/nonexistent/m",
               "learnig_rate=1e-3"])
    line = _one_line(capfd)
    assert rc == 2 and line.startswith("opo-train: error:")
    for key in ("'train_file'", "'val_file'", "'rewards'", "'sft_steps'", "'chat_template'",
                "'model'", "'learnig_rate'"):
        assert key in line, (key, line)
    assert "did you mean lr" in line
    assert not (tmp_path / "out").exists()


def test_task_hf_without_reward_says_how_to_name_one(tmp_path, capfd):
    data = _write_jsonl(tmp_path / "train.jsonl", ROWS)
    rc = main(["max_steps=1", "task=hf", f"train_file={data}", f"output_dir={tmp_path / 'out'}"])
    line = _one_line(capfd)
    assert rc == 2 and "'rewards'" in line and "module:function" in line


@pytest.mark.parametrize("case", ["empty_file", "no_rows", "no_config_json"])
def test_empty_data_and_model_without_config_json_fail_in_one_line(tmp_path, capfd, case):
    args = ["max_steps=1", f"output_dir={tmp_path / 'out'}"]
    if case == "empty_file":
        (tmp_path / "e.jsonl").write_text("")
        args += ["task=hf", f"train_file={tmp_path / 'e.jsonl'}", "rewards=toy"]
        key = "'train_file'"
    elif case == "no_rows":
        (tmp_path / "e.jsonl").write_text("\n\n")
        args += ["task=math", f"train_file={tmp_path / 'e.jsonl'}"]
        key = "no rows"
    else:
        (tmp_path / "m").mkdir()
        args += [f"model={tmp_path / 'm'}", f"tokenizer={Path(__file__).parents[1] / 'opo_train/assets/tiny_qwen3'}"]
        key = "config.json"
    rc = main(args)
    line = _one_line(capfd)
    assert rc == 2 and line.startswith("opo-train: error:") and key in line, line


def test_full_disk_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import torch

    from opo_train import checkpoint as ckpt
    real = torch.save

    def save(obj, f, *a, **k):  # the second checkpoint's RNG file hits a full disk
        if "step_000002" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real(obj, f, *a, **k)
    monkeypatch.setattr(ckpt.torch, "save", save)
    out = tmp_path / "full"
    with pytest.raises(TrainingStopped, match="no space left.*step_000001"):
        train(_cfg(out, "max_steps=3", "save_every=1"))
    assert [p.name for p in ckpt.complete(out)] == ["step_000001"]
    monkeypatch.setattr(ckpt.torch, "save", real)
    summary = train(_cfg(out, "max_steps=2", "resume=true"))
    assert Path(summary["checkpoint"]).name == "step_000002"


# -- DAPO: dynamic sampling filters on accuracy by default --------------------------------------------

def test_dapo_filters_on_accuracy_not_on_the_length_shaped_reward(tmp_path):
    never_right = lambda prompts, completions, **_: [0.0] * len(completions)  # noqa: E731
    base = ["max_steps=1", "loss=dapo", "dynamic_sampling_max_rounds=1", "zero_signal_steps=0",
            "overlong_buffer=3"]
    train(_cfg(tmp_path / "acc", *base), reward_fns=never_right, dataset=ROWS)
    row = _rows(tmp_path / "acc")[-1]
    # accuracy is 0 everywhere: no group has signal, whatever the length shaping adds
    assert (row["groups_kept_first_round"], row["sampling_rounds"], row["optimizer_steps"]) == (0, 2, 0)
    train(_cfg(tmp_path / "shaped", *base, "dynamic_sampling_metric=shaped_reward"),
          reward_fns=never_right, dataset=ROWS)
    row = _rows(tmp_path / "shaped")[-1]
    assert row["groups_kept_first_round"] > 0  # the old behaviour, still available by name


# -- interrupts and resumes -------------------------------------------------------------------------

def test_ctrl_c_saves_the_finished_step_and_resume_continues(tmp_path):
    calls = {"n": 0}

    def interrupting(prompts, completions, **_):
        calls["n"] += 1
        if calls["n"] == 2:  # in step 2: Ctrl-C, then SIGTERM as torchrun sends its ranks next
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
        return [len(c) % 3 / 2 for c in completions]
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as e:
        train(_cfg(out, "max_steps=5", "reward_isolation=thread", "tensorboard=true"),
              reward_fns=interrupting)
    assert e.value.signum == signal.SIGINT
    assert "step_000002" in str(e.value) and f"--config {out / 'config.yaml'} resume=true" in str(e.value)
    assert [r["step"] for r in _rows(out)] == [1, 2]
    # resume with the run's own config (as the message says); the data source is the toy task
    summary = train(load_config(str(out / "config.yaml"), ["resume=true", "max_steps=3"]))
    assert Path(summary["checkpoint"]).name == "step_000003"
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]


def _tb(d: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(d / "tb"))  # as TensorBoard reads the run's folder
    ea.Reload()
    return {t: [e.step for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}, ea.Tags()["tensors"]


def test_resume_refuses_a_changed_config_and_tensorboard_has_no_duplicates(tmp_path, capsys):
    import shutil
    out = tmp_path / "run"
    train(_cfg(out, "max_steps=4", "save_every=2", "tensorboard=true", "sft_steps=2",
               "sft_batch_size=8", "log_completions_every=2"))
    with pytest.raises(ConfigError, match=r"'resume'.*loss: 'opo' -> 'grpo'.*lr: 0.001 -> 1.0"):
        train(_cfg(out, "max_steps=4", "resume=true", "loss=grpo", "lr=1", "tensorboard=true",
                   "sft_steps=2", "sft_batch_size=8"))
    shutil.rmtree(out / "checkpoints" / "step_000004")  # resume from step 2: steps 3, 4 replayed
    train(_cfg(out, "max_steps=4", "resume=true", "tensorboard=true", "sft_steps=2", "sft_batch_size=8"))
    scalars, texts = _tb(out)
    assert scalars["rollout/reward_mean"] == [1, 2, 3, 4]  # no step twice
    groups = {t.split("/")[0] for t in scalars}
    assert groups == {"train", "rollout", "loss", "sft"}, groups
    assert "loss/loss" in scalars and "train/lr" in scalars and "sft/sft_loss" in scalars
    assert any(t.startswith("rollout/completions") for t in texts), texts
    # nothing to resume: said, and the run starts at step 0
    capsys.readouterr()
    train(_cfg(tmp_path / "empty", "max_steps=1", "resume=true"))
    assert "nothing to resume" in capsys.readouterr().out


# -- export and truncation ----------------------------------------------------------------------------

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}=>{% endif %}")


def test_exported_tokenizer_carries_the_chat_template(tmp_path):
    from transformers import AutoTokenizer
    out = tmp_path / "ct"
    train(_cfg(out, "max_steps=1", "export_hf=true", f"chat_template={TEMPLATE}"), reward_fns=length)
    tok = AutoTokenizer.from_pretrained(out / "hf_model")
    assert tok.chat_template == TEMPLATE


def test_long_prompts_are_an_error_unless_truncate_says_how(tmp_path, caplog):
    rows = [dict(r, prompt=r["prompt"] * (6 if i % 2 else 1)) for i, r in enumerate(ROWS)]
    with pytest.raises(ConfigError, match="'max_prompt_length'.*truncate=left"):
        train(_cfg(tmp_path / "e", "max_steps=1", "max_prompt_length=8"), reward_fns=length, dataset=rows)
    assert not (tmp_path / "e").exists()  # found before anything was built
    with caplog.at_level(logging.WARNING, logger="opo_train"):
        train(_cfg(tmp_path / "l", "max_steps=1", "max_prompt_length=8", "truncate=left"),
              reward_fns=length, dataset=rows)
    assert _rows(tmp_path / "l")[-1]["prompts_truncated"] > 0
    assert any("were cut on the left" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncate_cuts_the_named_side(side):
    from opo_train.model import load_tokenizer
    from opo_train.train import format_prompts
    cfg = load_config(None, ["max_steps=1", f"truncate={side}"])
    tok = load_tokenizer(cfg)
    full = tok("1234567890>", add_special_tokens=False)["input_ids"]
    counts = {}
    got = format_prompts([{"prompt": "1234567890>"}], tok, cfg, limit=4, counts=counts)[0]
    assert got == (full[-4:] if side == "left" else full[:4]) and counts == {"truncated": 1}


# -- what the run shows ---------------------------------------------------------------------------------

def test_console_line_shows_progress_eta_lr_throughput_memory(tmp_path, capsys):
    train(_cfg(tmp_path / "c", "max_steps=2", "warmup_steps=4", "lr_schedule=constant"), reward_fns=length, dataset=ROWS)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    assert len(lines) == 2
    first, last = lines
    assert " 50%" in first and "100%" in last and "ETA" in first and "ETA 0m00s" in last
    assert "lr 2.50e-04" in first and "lr 5.00e-04" in last  # warm-up: 1e-3 * (step + 1) / 4
    assert "tok/s" in first and " GB" in first and "mem -" not in first


def test_metrics_png_has_the_panels_and_no_overlapping_labels(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from opo_train.metrics import plot_rows
    out = tmp_path / "p"
    train(_cfg(out, "max_steps=3", "plot=true", "loss=grpo"), reward_fns=length, dataset=ROWS)
    assert (out / "metrics.png").stat().st_size > 0
    fig = plot_rows(plt, _rows(out))
    fig.canvas.draw()
    titles = [ax.get_title() for ax in fig.axes if ax.axison]
    for want in ("reward", "accuracy", "KL", "entropy", "clip fraction", "grad norm", "learning rate",
                 "completion length"):
        assert want in titles, titles
    assert any(t.startswith("rollout / trainer mismatch") for t in titles)
    renderer = fig.canvas.get_renderer()
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes if ax.axison]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), "panels' labels overlap"
    plt.close(fig)


# -- names: --help, TRL's aliases, suggestions, LoRA on the toy ----------------------------------------

def test_help_lists_every_key_with_default_and_doc(capsys):
    from opo_train.config import key_docs
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for key, (default, doc) in key_docs().items():
        assert f"  {key} = {default!r}\n" in text, key
        assert doc and doc in text, key


def test_trl_names_are_aliases_and_typos_find_them():
    trl = load_config(None, ["max_steps=1", "loss=grpo", "learning_rate=1e-4", "num_generations=4",
                             "per_device_train_batch_size=8", "max_completion_length=12", "beta=0.02",
                             "epsilon=0.3", "epsilon_high=0.25", "num_iterations=2"])
    ours = load_config(None, ["max_steps=1", "loss=grpo", "lr=1e-4", "group_size=4", "prompts_per_step=4",
                              "max_new_tokens=12", "beta=0.02", "clip_eps_low=0.3", "clip_eps_high=0.25",
                              "ppo_epochs=2"])
    assert trl == ours  # 8 completions x 1 process x 2 minibatches / 4 per prompt = 4 prompts
    for typo, want in (("learnig_rate", "lr"), ("learning_rat", "lr"), ("num_generation", "group_size"),
                       ("alpah", "alpha")):
        with pytest.raises(ConfigError, match=rf"did you mean [a-z_, ]*\b{want}\b"):
            load_config(None, ["max_steps=1", f"{typo}=1"])


def test_lora_on_the_random_init_toy_warns(caplog):
    from opo_train.train import machine_problems
    with caplog.at_level(logging.WARNING, logger="opo_train"):
        machine_problems(load_config(None, ["max_steps=1", "lora_r=8"]))
    assert any("cannot learn" in r.getMessage() for r in caplog.records)
