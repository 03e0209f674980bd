"""The ecosystem's language (issue 11): HF datasets, conversational prompts through a chat
template, TRL-style reward functions, LoRA through peft, report_to, sample tables."""
import json
from pathlib import Path

import pytest
import torch

from opo_train import load_config, train

SMALL = ["prompts_per_step=4", "group_size=4", "max_new_tokens=4", "sft_steps=0", "val_every=0",
         "minibatches=2", "lr=1e-3", "plot=false", "tensorboard=false", "export_hf=false"]
# A chat template for the character-level tiny tokenizer: "<role>: content\n" per message.
TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}a:{% endif %}")


def _rows(d: Path, name="metrics.jsonl"):
    return [json.loads(x) for x in (d / name).read_text().splitlines() if x.strip()]


def test_conversational_prompts_through_the_chat_template(tmp_path):
    seen = {}

    def reward(prompts, completions, completion_ids, answer, **kwargs):  # TRL's convention
        seen.setdefault("prompts", prompts)
        seen.setdefault("completions", completions)
        seen.setdefault("ids", completion_ids)
        return [float(len(c[0]["content"]) % 3) for c in completions]

    rows = [{"prompt": [{"role": "system", "content": "rev"}, {"role": "user", "content": f"{i}7>"}],
             "answer": f"7{i}"} for i in range(10)]
    cfg = load_config(None, [*SMALL, "max_steps=2", f"output_dir={tmp_path}",
                             f"chat_template={TEMPLATE}", "reward_isolation=thread"])
    train(cfg, reward_fns=reward, dataset=rows)
    got = _rows(tmp_path)
    assert [r["step"] for r in got] == [1, 2] and got[-1]["optimizer_steps"] == 2
    assert isinstance(seen["prompts"][0], list) and seen["prompts"][0][0]["role"] == "system"
    c = seen["completions"][0]
    assert isinstance(c, list) and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
    assert all(isinstance(t, int) for t in seen["ids"][0])


def test_conversational_prompts_need_a_template(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "12>"}], "answer": "21"}] * 4
    cfg = load_config(None, [*SMALL, "max_steps=1", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="chat_template"):
        train(cfg, reward_fns=lambda p, c, **k: [0.0] * len(p), dataset=rows)


def test_hf_datasets_dataset_and_local_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    from opo_train.data import as_dataset
    rows = [{"prompt": f"{i}{i + 1}>", "answer": f"{i + 1}{i}"} for i in range(8)]
    ds = datasets.Dataset.from_list(rows)
    src = as_dataset(ds, seed=0)
    assert len(src) == 8 and sorted(r["prompt"] for r in src.batch(0, 8)) == sorted(r["prompt"] for r in rows)
    # a local file through datasets.load_dataset (config: task=hf)
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [*SMALL, "max_steps=1", "task=hf", f"train_file={f}", "rewards=[toy]",
                             f"output_dir={tmp_path / 'run'}"])
    summary = train(cfg)
    assert summary["step"] == 1
    summary = train(load_config(None, [*SMALL, "max_steps=1", f"output_dir={tmp_path / 'run2'}"]),
                    dataset=ds)
    assert summary["step"] == 1
