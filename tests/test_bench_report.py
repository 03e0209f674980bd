"""The GPU tables of the README and docs/benchmarks.md are the ones bench.report generates from
the committed results."""
import json
from pathlib import Path

import pytest

from bench import report

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("doc", ["README.md", "docs/benchmarks.md"])
def test_gpu_table_is_generated_from_the_committed_json(tmp_path, doc):
    src = "bench/results/2026-11-27-h200.json"
    run = json.loads((ROOT / src).read_text())
    for case in run["cases"]:
        report.derive_case(case)
    want = report.readme_table(run, src)
    readme = (ROOT / doc).read_text()
    begin, end = report.README_BEGIN.format("gpu"), report.README_END.format("gpu")
    block = readme[readme.index(begin) + len(begin):readme.index(end)].strip()
    assert block == want.strip()
    # and the generator rewrites exactly that block
    copy = tmp_path / "doc.md"
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


def test_t_sweep_shapes_and_plot(tmp_path):
    """The T sweep keeps N (B = N / T sequences, at least one) and plots x floor against T."""
    from bench.cases import Shape, sweep_shapes
    base = Shape(4, 256, 512, 32000)
    shapes = sweep_shapes(base, "t", [256, 2048, 8192])
    assert [(s.B, s.T, s.N) for s in shapes] == [(4, 256, 1024), (1, 2048, 2048), (1, 8192, 8192)]
    cases = []
    for s, t in zip(shapes, (1.0, 2.0, 8.0)):
        case = {"group": "sweep-t", "label": s.label(), "inputs": "peaked", "B": s.B, "T": s.T,
                "N": s.N, "H": s.H, "V": s.V, "dtype": s.dtype,
                "methods": [{"name": "gemm_floor", "status": "ok", "time_s": t, "samples_s": [t],
                             "peak_bytes": 4 * s.N * s.V},
                            {"name": "opo_native", "status": "ok", "time_s": 1.05 * t,
                             "samples_s": [1.05 * t], "peak_bytes": 4 * 512 * s.V}]}
        report.derive_case(case)
        cases.append(case)
    r = cases[2]["methods"][1]
    assert abs(r["x_floor"] - 1.05) < 1e-12 and r["x_logits_mem"] == 512 / 8192
    run = {"meta": {"device_name": "cpu", "device": "cpu", "timing": "t", "command": "c"},
           "cases": cases}
    assert report.plot_t_sweep(run, tmp_path / "t.png") and (tmp_path / "t.png").stat().st_size
    assert "1x8192 V=32000" in report.readme_table(run, "x.json", "sweep-t")
