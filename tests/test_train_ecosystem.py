"""The ecosystem's language: HF datasets, conversational prompts through a chat
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


def test_lora_run_trains_adapters_only_and_exports_merged_and_adapter(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def varied(prompts, completions, **_):
        return [sum(map(ord, c)) % 7 / 6 for c in completions]

    out = tmp_path / "lora"
    cfg = load_config(None, [*SMALL, "max_steps=2", "lora_r=4", "lora_alpha=8", "export_hf=true",
                             "lr=1e-2", f"output_dir={out}"])
    summary = train(cfg, reward_fns=varied)
    rows = _rows(out)
    assert rows[-1]["optimizer_steps"] == 2 and rows[-1]["grad_norm"] > 0
    assert rows[0]["delta_abs_first"] == 0.0 and rows[-1]["delta_abs_last"] > 0
    assert summary["step"] == 2
    merged = AutoModelForCausalLM.from_pretrained(out / "hf_model").eval()
    adapter = out / "hf_model" / "adapter"
    base = AutoModelForCausalLM.from_pretrained(adapter / "base_model").eval()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    # only adapted modules changed; the head and embeddings are the base's
    m_sd = merged.state_dict()
    assert torch.equal(m_sd["lm_head.weight"], base_sd["lm_head.weight"])
    assert torch.equal(m_sd["model.embed_tokens.weight"], base_sd["model.embed_tokens.weight"])
    assert not torch.equal(m_sd["model.layers.0.self_attn.q_proj.weight"],
                           base_sd["model.layers.0.self_attn.q_proj.weight"])
    # base + adapter, merged by peft == the exported merged model
    again = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
    for k, v in m_sd.items():
        torch.testing.assert_close(again[k], v, rtol=1e-5, atol=1e-6)


def test_report_to_and_sample_tables(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    cfg = load_config(None, [*SMALL, "max_steps=2", "tensorboard=true", "report_to=[tensorboard]",
                             "log_completions_every=1", "log_completions_count=3", f"output_dir={out}"])
    train(cfg)
    assert list((out / "tb").glob("events.out.tfevents.*"))
    table = _rows(out, "completions.jsonl")
    assert [r["step"] for r in table] == [1, 1, 1, 2, 2, 2]
    assert set(table[0]) == {"step", "prompt", "completion", "reward", "advantage"}
    assert "samples step 2:" in capsys.readouterr().out
    with pytest.raises(ValueError, match="'report_to'"):
        load_config(None, ["report_to=[mlflow]"])
    try:
        import wandb  # noqa: F401
    except ImportError:  # not installed here: a clear error naming the key, before anything runs
        with pytest.raises(ValueError, match="'report_to'.*wandb"):
            train(load_config(None, [*SMALL, "max_steps=1", "report_to=[wandb]",
                                     f"output_dir={tmp_path / 'w'}"]))
        assert not (tmp_path / "w").exists()
