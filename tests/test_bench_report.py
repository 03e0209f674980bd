"""The README's GPU table is the one bench.report generates from the committed results."""
import json
from pathlib import Path

from bench import report

ROOT = Path(__file__).resolve().parents[1]


def test_readme_gpu_table_is_generated_from_the_committed_json(tmp_path):
    src = "bench/results/2026-11-27-h200.json"
    run = json.loads((ROOT / src).read_text())
    for case in run["cases"]:
        report.derive_case(case)
    want = report.readme_table(run, src)
    readme = (ROOT / "README.md").read_text()
    begin, end = report.README_BEGIN.format("gpu"), report.README_END.format("gpu")
    block = readme[readme.index(begin) + len(begin):readme.index(end)].strip()
    assert block == want.strip()
    # and the generator rewrites exactly that block
    copy = tmp_path / "README.md"
    copy.write_text(readme.replace(block, "stale"))
    report.update_readme(copy, "gpu", want)
    assert copy.read_text() == readme


def test_gpu_targets_use_the_gpu_limits():
    run = json.loads((ROOT / "bench/results/2026-11-27-h200.json").read_text())
    for case in run["cases"]:
        report.derive_case(case)
    rows = {(t["inputs"], t["method"]): t for t in report.targets(run["cases"], "cuda")}
    t = rows[("peaked", "opo_triton")]
    case = next(c for c in run["cases"] if c["inputs"] == "peaked")
    ms = {m["name"]: m for m in case["methods"]}
    assert t["x_liger"] == ms["opo_triton"]["time_s"] / ms["liger_grpo_chunked"]["time_s"]
    assert t["x_liger_mem"] == ms["opo_triton"]["peak_bytes"] / ms["liger_grpo_chunked"]["peak_bytes"]
    table = report.targets_table(run)
    assert "<= 1.3" in table and "MISSED" in table
