"""A real run loses nothing and tells the truth: output_dir ownership, resume bounds, fresh
validation weights, corrupt-checkpoint fallback. In-process runs of
the tiny model, a second or two each."""
import json
from pathlib import Path

import pytest
import torch

from opo_train import load_config, train

SMALL = ["prompts_per_step=4", "group_size=4", "max_new_tokens=4", "sft_steps=0", "val_every=0",
         "minibatches=2", "lr=1e-3", "plot=false", "tensorboard=false", "export_hf=false"]


def _cfg(out, *extra):
    return load_config(None, [*SMALL, f"output_dir={out}", *extra])


def varied(prompts, completions, **_):
    """A deterministic reward that varies even for a random-init model (so loss and gradients
    are not all zero and the resume comparisons mean something)."""
    return [sum(map(ord, c)) % 7 / 6 for c in completions]


def _rows(d: Path, name="metrics.jsonl"):
    return [json.loads(x) for x in (d / name).read_text().splitlines() if x.strip()]


def _ckpts(d: Path):
    return sorted(p.name for p in (d / "checkpoints").iterdir() if (p / "COMPLETE").exists())


# -- item 1: an existing run in output_dir is never mixed with a new one ----------------------

def test_rerun_into_existing_output_dir_is_refused(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, "max_steps=4", "save_every=2"))
    before = _ckpts(out)
    assert before == ["step_000002", "step_000004"]
    mtime = (out / "checkpoints" / "step_000004" / "trainer_state.json").stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"'output_dir'.*resume=true.*overwrite=true"):
        train(_cfg(out, "max_steps=2", "save_every=1"))
    # Nothing of the old run was touched.
    assert _ckpts(out) == before
    assert (out / "checkpoints" / "step_000004" / "trainer_state.json").stat().st_mtime_ns == mtime
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]


def test_overwrite_starts_clean(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, "max_steps=4", "save_every=2"))
    summary = train(_cfg(out, "max_steps=2", "save_every=1", "overwrite=true"))
    assert _ckpts(out) == ["step_000001", "step_000002"]
    assert Path(summary["checkpoint"]).exists()
    assert [r["step"] for r in _rows(out)] == [1, 2]
    # a later resume continues the new run, not the old one
    summary = train(_cfg(out, "max_steps=3", "resume=true"))
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]
    assert Path(summary["checkpoint"]).name == "step_000003"


# -- item 2: resume never rewrites a checkpoint with later weights -----------------------------

def test_resume_with_max_steps_below_checkpoint_is_refused(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, "max_steps=4", "save_every=2"))
    ck = out / "checkpoints" / "step_000004"
    mtime = (ck / "trainer_state.json").stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"'max_steps'.*2.*step_000004.*4"):
        train(_cfg(out, "max_steps=2", "resume=true"))
    assert (ck / "trainer_state.json").stat().st_mtime_ns == mtime
    assert _ckpts(out) == ["step_000002", "step_000004"]


def test_resume_at_max_steps_rewrites_nothing(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, "max_steps=2"))
    ck = out / "checkpoints" / "step_000002"
    mtime = (ck / "COMPLETE").stat().st_mtime_ns
    summary = train(_cfg(out, "max_steps=2", "resume=true"))
    assert (ck / "COMPLETE").stat().st_mtime_ns == mtime
    assert Path(summary["checkpoint"]) == ck


# -- item 3: validation scores the weights after the step's updates ---------------------------

def _greedy_val_reward(model_dir: Path, rows) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opo_train.rewards import toy_reward
    m = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    comps = []
    with torch.no_grad():
        for r in rows:  # one prompt at a time: no padding question at all
            ids = tok(r["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
            out = m.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
            comps.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    rw = toy_reward([r["prompt"] for r in rows], comps, [r["answer"] for r in rows])
    return sum(rw) / len(rw)


def test_validation_scores_the_updated_weights(tmp_path):
    from opo_train.data import ToyTask
    out = tmp_path / "run"
    cfg = _cfg(out, "max_steps=1", "val_every=1", "val_size=16", "lr=3e-3", "export_hf=true",
               "sft_steps=15", "sft_batch_size=16")
    train(cfg)
    row = _rows(out)[-1]
    rows = ToyTask(cfg.seed, "val", cfg.toy_digits, cfg.toy_task).fixed(16)
    exported = _greedy_val_reward(out / "hf_model", rows)
    assert row["val_reward"] == pytest.approx(exported, abs=1e-6)


# -- item 7: a corrupt checkpoint that carries COMPLETE falls back to the previous one ----------

@pytest.mark.parametrize("damage", ["shard", "state"])
def test_corrupt_checkpoint_falls_back(tmp_path, damage, caplog):
    ref = tmp_path / "ref"
    const = ["lr_schedule=constant", "warmup_steps=0"]  # the lr of a step must not depend on max_steps
    train(_cfg(ref, "max_steps=4", "save_every=1", "keep_checkpoints=3", *const), reward_fns=varied)
    out = tmp_path / "run"
    train(_cfg(out, "max_steps=3", "save_every=1", "keep_checkpoints=3", *const), reward_fns=varied)
    bad = out / "checkpoints" / "step_000003"
    assert (bad / "COMPLETE").exists()
    if damage == "shard":
        for f in bad.glob("*.distcp"):
            f.write_bytes(f.read_bytes()[: 100])
    else:
        (bad / "trainer_state.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="opo_train"):
        summary = train(_cfg(out, "max_steps=4", "save_every=1", "keep_checkpoints=3", "resume=true",
                             *const),
                        reward_fns=varied)
    assert "step_000003" in caplog.text and "corrupt" in caplog.text.lower()
    assert summary["step"] == 4
    a, b = _rows(ref), _rows(out)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a[3]["grad_norm"] > 0
    for k in ["reward_mean", "loss", "grad_norm"]:
        assert b[3][k] == pytest.approx(a[3][k], rel=1e-5, abs=1e-8), k


# -- item 4: a run without any reward stops, saying why ------------------------------------------

def test_run_without_any_reward_stops_with_a_clear_error(tmp_path):
    from opo_train.train import TrainingStopped

    def never(prompts, completions, **_):
        return ["n/a"] * len(prompts)

    with pytest.raises(TrainingStopped, match=r"3 steps in a row.*invalid values 48.*'n/a'"):
        train(_cfg(tmp_path / "run", "max_steps=10"), reward_fns=never)
    assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2]
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- item 9: a run that cannot learn says so ------------------------------------------------------

def test_zero_reward_and_gradient_are_warned_about(tmp_path, caplog):
    cfg = _cfg(tmp_path / "run", "toy_task=add", "sft_steps=0", "max_steps=3", "zero_signal_steps=2")
    with caplog.at_level("WARNING", logger="opo_train"):
        train(cfg)
    assert _rows(tmp_path / "run")[-1]["reward_mean"] == 0.0
    msgs = [r.getMessage() for r in caplog.records if "no learning signal" in r.getMessage()]
    assert len(msgs) == 1 and "2 steps" in msgs[0] and "sft_steps" in msgs[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="opo_train"):  # a run with a signal: no warning
        train(_cfg(tmp_path / "run2", "max_steps=3", "zero_signal_steps=2"), reward_fns=varied)
    assert "no learning signal" not in caplog.text


# -- item 10: the HF export pads on the left, and any checkpoint can be exported ------------------

def test_hf_export_pads_left_and_checkpoints_export(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opo_train.export import main as export_main
    out = tmp_path / "run"
    train(_cfg(out, "max_steps=2", "save_every=1", "export_hf=true"), reward_fns=varied)
    tok = AutoTokenizer.from_pretrained(out / "hf_model")
    assert tok.padding_side == "left"
    m = AutoModelForCausalLM.from_pretrained(out / "hf_model").eval()
    prompts = ["12>", "98765>"]
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        together = m.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        for i, p in enumerate(prompts):  # batched greedy == one prompt at a time
            ids = tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
            alone = m.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
            assert together[i, -3:].tolist() == alone[0, -3:].tolist()
    # any DCP checkpoint -> HF: the final one equals the run's own export, an earlier one differs
    assert export_main([str(out / "checkpoints" / "step_000002"), str(tmp_path / "e2")]) == 0
    assert export_main([str(out / "checkpoints" / "step_000001"), str(tmp_path / "e1")]) == 0
    e2 = AutoModelForCausalLM.from_pretrained(tmp_path / "e2").state_dict()
    e1 = AutoModelForCausalLM.from_pretrained(tmp_path / "e1").state_dict()
    ref = m.state_dict()
    assert e2.keys() == ref.keys()
    assert all(torch.equal(e2[k], ref[k]) for k in ref)
    assert any(not torch.equal(e1[k], ref[k]) for k in ref)
    assert AutoTokenizer.from_pretrained(tmp_path / "e1").padding_side == "left"


# -- item 11: metrics say what they mean -----------------------------------------------------------

def test_baselines_log_no_omega(tmp_path):
    train(_cfg(tmp_path / "g", "max_steps=1", "loss=grpo"), reward_fns=varied)
    row = _rows(tmp_path / "g")[-1]
    assert row["optimizer_steps"] == 2
    assert row["omega_min"] is None and row["omega_max"] is None and row["omega_std"] is None
    train(_cfg(tmp_path / "o", "max_steps=1"), reward_fns=varied)
    row = _rows(tmp_path / "o")[-1]
    assert row["omega_min"] < row["omega_max"]


# -- item 11: DAPO's dynamic sampling refills the batch, bounded -----------------------------------

def test_dapo_dynamic_sampling_refills_the_batch(tmp_path):
    def half_constant(prompts, completions, const, **_):
        return [0.5 if k else sum(map(ord, c)) % 7 / 6 for c, k in zip(completions, const)]

    rows = [{"prompt": f"{i}{i % 7}>", "answer": "0", "const": i % 2 == 0} for i in range(40)]
    out = tmp_path / "dapo"
    train(_cfg(out, "max_steps=2", "loss=dapo", "overlong_buffer=0"), reward_fns=half_constant, dataset=rows)
    got = _rows(out)
    first = got[0]  # this data's first step draws constant-reward prompts: some groups dropped
    assert first["groups_kept_first_round"] < 4 and first["sampling_rounds"] >= 2
    for row in got:
        assert row["groups_kept"] == 4 and row["optimizer_steps"] == 2  # refilled to P = 4
    # bounded: nothing to keep at all -> 1 + max_rounds rounds, then the step goes on without update
    out = tmp_path / "flat"
    train(_cfg(out, "max_steps=1", "loss=dapo", "overlong_buffer=0", "dynamic_sampling_max_rounds=2",
               "zero_signal_steps=0"),
          reward_fns=lambda p, c, **_: [0.5] * len(p), dataset=rows)
    row = _rows(out)[-1]
    assert (row["sampling_rounds"], row["groups_kept"], row["optimizer_steps"]) == (3, 0, 0)
