"""opo_train configuration and data loading: overrides, clear errors naming the key / row."""
import json

import pytest

from opo_train.config import Config, load_config, parse_override
from opo_train.data import ListDataset, ToyTask, last_boxed, load_math
from opo_train.config import CONFIG_DIR


def test_shipped_configs_load():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert "toy" in names and any(n.startswith("exp1") for n in names) and any(n.startswith("exp2") for n in names)
    toy = load_config()
    assert toy.task == "toy" and toy.loss == "opo" and toy.model == "tiny"
    e1 = load_config(next(n for n in names if n.startswith("exp1")),
                     ["train_file=/x.jsonl"])  # the paper's Experiment 1
    assert (e1.alpha, e1.mu, e1.lr, e1.prompts_per_step, e1.group_size, e1.epochs, e1.dtype,
            e1.engine) == (0.4, 1.0, 2e-6, 32, 6, 4.0, "bfloat16", "vllm")
    e2 = load_config(next(n for n in names if n.startswith("exp2")))
    assert e2.train_fraction == pytest.approx(0.1) and e2.val_every == 10 and e2.val_size == 100
    assert e2.val_levels == ["Level 4"] and e2.train_levels == ["Level 3"]


def test_overrides_are_typed():
    cfg = load_config(None, ["max_steps=3", "output_dir=runs/x", "seed=1", "lr=1e-3", "resume=true",
                             "train_levels=[Level 3]", "model_overrides.vocab_size=256",
                             "max_log_ratio=none", "loss=grpo"])
    assert (cfg.max_steps, cfg.output_dir, cfg.seed, cfg.lr, cfg.resume) == (3, "runs/x", 1, 1e-3, True)
    assert cfg.train_levels == ["Level 3"] and cfg.model_overrides == {"vocab_size": 256}
    assert cfg.max_log_ratio is None and cfg.loss == "grpo"
    assert parse_override("output_dir=1e3") == ("output_dir", "1e3")


@pytest.mark.parametrize("override,key", [
    ("alpha=1.5", "alpha"), ("mu=0", "mu"), ("loss=ppo", "loss"), ("max_steps=abc", "max_steps"),
    ("group_size=1", "group_size"), ("minibatches=3", "minibatches"), ("lr=-1", "lr"),
    ("resume=maybe", "resume"), ("temperature=0", "temperature"), ("engine=sglang", "engine"),
    ("seed=1.5", "seed"), ("top_p=2", "top_p"), ("toy_task=mul", "toy_task"),
    ("cpu_threads=-1", "cpu_threads"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        load_config(None, [override])


def test_unknown_key_suggests():
    with pytest.raises(ValueError, match="unknown config key 'alpah'.*alpha"):
        load_config(None, ["alpah=0.3"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["alpha"])
    with pytest.raises(ValueError, match="not found"):
        load_config("no_such_config", [])


def test_yaml_errors_name_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("alpha: high\n")
    with pytest.raises(ValueError, match=r"'alpha'.*c\.yaml"):
        load_config(str(p))
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(str(p))


def test_math_config_needs_train_file():
    with pytest.raises(ValueError, match="'train_file'"):
        load_config(None, ["task=math", "epochs=1"])
    cfg = Config()
    cfg.alpha = -0.1
    with pytest.raises(ValueError, match="'alpha'"):
        cfg.validate()


def test_last_boxed():
    assert last_boxed(r"a \boxed{1} b \boxed{\frac{1}{2}} c") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"
    assert last_boxed("no answer") is None
    assert last_boxed(r"\boxed{unclosed") is None


def _write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def test_load_math_filters_and_validates(tmp_path):
    good = [{"problem": f"P{i}", "solution": f"so \\boxed{{{i}}}", "level": f"Level {3 + i % 2}"}
            for i in range(10)]
    p = _write(tmp_path, good)
    rows = load_math(p, levels=["Level 3"], prompt_suffix=" S")
    assert [r["answer"] for r in rows] == ["0", "2", "4", "6", "8"]
    assert rows[0]["prompt"] == "P0 S" and rows[0]["level"] == "Level 3"
    assert len(load_math(p, levels=[4])) == 5
    assert len(load_math(p, fraction=0.3)) == 3
    assert len(load_math(p, size=4)) == 4
    for bad, msg in [({"solution": "\\boxed{1}"}, "row 2: 'problem'"),
                     ({"problem": "x", "solution": "no box"}, r"row 2: 'solution' has no \\boxed"),
                     ({"problem": "x"}, "row 2: needs a 'solution'"),
                     ({"problem": "", "solution": "\\boxed{1}"}, "row 2: 'problem'")]:
        p = _write(tmp_path, good[:2] + [bad], "bad.jsonl")
        with pytest.raises(ValueError, match=msg):
            load_math(p)
    p = _write(tmp_path, [json.dumps(good[0]), "{not json"], "broken.jsonl")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_math(p)
    with pytest.raises(ValueError, match="does not exist"):
        load_math(tmp_path / "missing.jsonl")


def test_shipped_math_fixture_loads():
    from opo_train.config import ASSETS_DIR
    rows = load_math(ASSETS_DIR / "math_fixture.jsonl")
    assert len(rows) >= 8 and all(r["answer"] for r in rows)
    assert {r["level"] for r in rows} >= {"Level 3", "Level 4"}


def test_list_dataset_rows_and_epochs():
    with pytest.raises(ValueError, match="row 1 needs a 'prompt': a non-empty string or a list of messages"):
        ListDataset([{"prompt": "a"}, {"question": "b"}])
    with pytest.raises(ValueError, match="row 0 must be a dict"):
        ListDataset(["a"])
    ds = ListDataset([{"prompt": str(i)} for i in range(5)], seed=1)
    seen = [r["prompt"] for s in range(5) for r in ds.batch(s, 2)]  # 2 epochs
    assert sorted(seen) == sorted([str(i) for i in range(5)] * 2)
    assert ds.batch(3, 2) == ds.batch(3, 2)


@pytest.mark.parametrize("op", ["add", "reverse"])
def test_toy_splits_are_disjoint(op):
    sft = {r["prompt"] for s in range(40) for r in ToyTask(0, "sft", 3, op).batch(s, 64)}
    train = {r["prompt"] for s in range(40) for r in ToyTask(0, "train", 3, op).batch(s, 64)}
    val = {r["prompt"] for r in ToyTask(0, "val", 3, op).fixed(64)}
    assert sft and train and val and not (sft & train) and not (sft & val) and not (train & val)
    for r in ToyTask(0, "train", 3, op).batch(0, 20):
        if op == "add":
            a, b = r["prompt"][:-1].split("+")
            assert int(r["answer"]) == int(a) + int(b)
        else:
            assert r["prompt"].endswith(">") and r["answer"] == r["prompt"][:-1][::-1]
            assert 2 <= len(r["answer"]) <= 5
    assert ToyTask(0, "train", 3, op).batch(7, 5) == ToyTask(0, "train", 3, op).batch(7, 5)
    with pytest.raises(ValueError, match="toy_task"):
        ToyTask(0, "train", 3, "mul")


def test_learning_rate_schedule():
    import math
    from opo_train.train import learning_rate
    cfg = load_config(None, ["lr=1e-3", "warmup_steps=10", "lr_schedule=cosine", "lr_min_ratio=0.1"])
    lrs = [learning_rate(cfg, s, 101) for s in range(101)]
    ref = [1e-3 * min(1.0, (s + 1) / 10) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 100)))
           for s in range(101)]
    assert lrs == pytest.approx(ref, rel=1e-12)
    assert lrs[-1] == pytest.approx(1e-4)
    cfg = load_config(None, ["lr=1e-3", "warmup_steps=0", "lr_schedule=constant"])
    assert learning_rate(cfg, 50, 100) == 1e-3


def test_yaml_names_its_base_config(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: toy\nmax_steps: 7\nlr: 1.0e-3\n")
    cfg = load_config(str(tmp_path / "mine.yaml"))
    toy = load_config("toy")
    assert (cfg.max_steps, cfg.lr) == (7, 1e-3)
    # everything else is the toy config's, not the dataclass defaults
    assert (cfg.toy_task, cfg.sft_steps, cfg.warmup_steps) == (toy.toy_task, toy.sft_steps, toy.warmup_steps)
    assert cfg.sft_steps > 0 and cfg.toy_task != Config().toy_task
    # a chain of bases, relative to the file that names it; overrides still win
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("base: ../mine.yaml\nseed: 3\n")
    c2 = load_config(str(tmp_path / "sub" / "child.yaml"), ["max_steps=9"])
    assert (c2.seed, c2.max_steps, c2.lr, c2.sft_steps) == (3, 9, 1e-3, toy.sft_steps)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="'base'.*cycle"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: nothing_like_it\n")
    with pytest.raises(ValueError, match=r"'base'.*nothing_like_it.*not found"):
        load_config(str(tmp_path / "c.yaml"))
