"""Write one benchmark run out: JSON (everything), a markdown table, PNG sweep plots.

The run dict (built by :mod:`bench.__main__`) holds ``meta`` (device, versions, command) and
``cases``: one dict per (shape, inputs) with ``floor_s`` and per-method rows ``{name, status,
time_s, samples_s, min_s, x_floor, x_floor_min, peak_bytes, peak_raw_bytes, x_naive_mem,
loss}``. ``python -m bench.report RUN.json`` re-derives the ratios and rewrites the .md and
plots from a JSON's raw numbers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

MiB = 1 << 20
# The backend "auto" picks on each device: the one the targets are about.
AUTO_METHOD = {"cpu": "opo_native", "cuda": "opo_triton"}


def derive_case(case: dict) -> None:
    """Ratios from the raw numbers, in place: to the floor (median and best run) and to the
    naive baseline's peak memory."""
    fl = next((r for r in case["methods"] if r["name"] == "gemm_floor"), None)
    if fl is None or fl["status"] != "ok":  # no floor, no ratios; the statuses say why
        case.update(floor_s=None, floor_samples_s=[])
        return
    floor_s = fl["time_s"]
    case.update(floor_s=floor_s, floor_samples_s=fl["samples_s"])
    floor_min = min(fl["samples_s"])
    naive = next((r for r in case["methods"] if r["name"] == "naive_opo"), None)
    for r in case["methods"]:
        if r["status"] != "ok":
            continue
        r["x_floor"] = r["time_s"] / floor_s
        # Best-of-N beside the median: on a shared machine the fastest round is the one least
        # disturbed by other processes (on CUDA: do_bench's 20th percentile).
        r["min_s"] = min(r["samples_s"])
        r["x_floor_min"] = r["min_s"] / floor_min
        if naive is not None and naive["status"] == "ok" and naive.get("peak_bytes"):
            r["x_naive_mem"] = r["peak_bytes"] / naive["peak_bytes"]


def targets(cases: list, device: str) -> list:
    """Issue 4's three ratios for the auto backend (and the fused one on CUDA) at the headline
    shape, per inputs kind."""
    out = []
    names = (AUTO_METHOD[device], "opo_fused") if device == "cuda" else (AUTO_METHOD[device],)
    for c in cases:
        if c["group"] != "headline":
            continue
        rows = {r["name"]: r for r in c["methods"]}
        liger = rows.get("liger_grpo_chunked")
        for name in names:
            r = rows.get(name)
            if r is None:
                continue
            ok = r["status"] == "ok"
            lok = ok and liger is not None and liger["status"] == "ok"
            out.append({
                "inputs": c["inputs"], "method": name, "status": r["status"],
                "x_floor": r.get("x_floor") if ok else None,
                "x_floor_min": r.get("x_floor_min") if ok else None,
                "x_liger": r["time_s"] / liger["time_s"] if lok else None,
                "x_liger_min": r["min_s"] / liger["min_s"] if lok else None,
                "x_naive_mem": r.get("x_naive_mem") if ok else None,
            })
    return out


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def case_table(case: dict) -> str:
    rows = ["| method | status | fwd+bwd median (ms) | x floor | best (ms) | x floor (best) "
            "| peak above inputs+grads (MiB) | x naive mem | loss |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in case["methods"]:
        t, pb, tm = r.get("time_s"), r.get("peak_bytes"), r.get("min_s")
        rows.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["name"], r["status"], _fmt(None if t is None else t * 1e3, ".1f"),
            _fmt(r.get("x_floor"), ".2f"), _fmt(None if tm is None else tm * 1e3, ".1f"),
            _fmt(r.get("x_floor_min"), ".2f"), _fmt(None if pb is None else pb / MiB, ".1f"),
            _fmt(r.get("x_naive_mem"), ".3f"), _fmt(r.get("loss"), ".5f")))
    return "\n".join(rows)


def case_header(case: dict) -> str:
    fs = case["floor_samples_s"]
    if not fs:
        return (f"### {case['group']}: {case['label']}, {case['inputs']} inputs\n\n"
                "The GEMM floor did not run (see its status): no ratios.\n")
    return (f"### {case['group']}: {case['label']}, {case['inputs']} inputs\n\n"
            f"Mean token entropy {case['entropy']:.2f} nats (log V = {math.log(case['V']):.2f}), "
            f"mean target log-prob {case['target_logp']:.2f}; floor {case['floor_s'] * 1e3:.1f} ms "
            f"(median of {len(fs)}, range {min(fs) * 1e3:.1f}-{max(fs) * 1e3:.1f} ms).\n")


def targets_table(run: dict) -> str:
    if not run.get("targets"):
        return ""
    rows = ["| inputs | method | x floor (<= 1.05): median / best | x Liger chunked time (<= 0.5): "
            "median / best | x naive peak memory (<= 0.25) |", "|---|---|---:|---:|---:|"]

    def cell(v, lim):
        if v is None:
            return "n/a"
        return f"{v:.3f} {'ok' if v <= lim else 'MISSED'}"
    for t in run["targets"]:
        rows.append(f"| {t['inputs']} | {t['method']} | {cell(t['x_floor'], 1.05)} / "
                    f"{cell(t.get('x_floor_min'), 1.05)} | {cell(t['x_liger'], 0.5)} / "
                    f"{cell(t.get('x_liger_min'), 0.5)} | {cell(t['x_naive_mem'], 0.25)} |")
    return "\n".join(rows)


def markdown(run: dict) -> str:
    m = run["meta"]
    out = [f"## Benchmark: {m['device_name']} ({m['date']})", "",
           f"Command: `{m['command']}`", "",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), "",
           f"Threads: {m.get('threads')}. Timing: {m['timing']}. Memory: {m['memory']}. "
           f"Load average (1 min) at start / end: {m.get('load_avg_start')} / "
           f"{m.get('load_avg_end')}.", ""]
    if run.get("targets"):
        out += ["### Targets (issue 4) at the headline shape", "", targets_table(run), ""]
    for case in run["cases"]:
        out += [case_header(case), case_table(case), ""]
    if run.get("plots"):
        out += ["Plots: " + ", ".join(f"`{p}`" for p in run["plots"]), ""]
    return "\n".join(out)


def plot_sweep(run: dict, group: str, axis: str, path: Path) -> bool:
    cases = [c for c in run["cases"] if c["group"] == group]
    if len(cases) < 2:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "N" if axis == "n" else "V"
    xs = [c[key] for c in cases]
    names = [r["name"] for r in cases[0]["methods"]]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    for name in names:
        rows = [next(r for r in c["methods"] if r["name"] == name) for c in cases]
        pts = [(x, r) for x, r in zip(xs, rows) if r["status"] == "ok"]
        if not pts:
            continue
        style = dict(color="k", ls="--", lw=2) if name == "gemm_floor" else dict(marker="o")
        label = "GEMM floor" if name == "gemm_floor" else name
        ax_t.plot([p[0] for p in pts], [p[1]["time_s"] * 1e3 for p in pts], label=label, **style)
        mem = [(p[0], p[1]["peak_bytes"]) for p in pts if p[1].get("peak_bytes") is not None]
        if mem:
            ax_m.plot([p[0] for p in mem], [max(b, 1) / MiB for _, b in mem], label=label,
                      **style)
    for ax, title, unit in ((ax_t, "forward+backward time", "ms"),
                            (ax_m, "peak memory above inputs and gradients", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    c0 = cases[0]
    fixed = f"H={c0['H']}, " + (f"V={c0['V']}" if axis == "n" else f"N={c0['N']}")
    fig.suptitle(f"{run['meta']['device_name']}: sweep over {key} ({fixed}, {c0['dtype']}, "
                 f"{c0['inputs']} inputs; floor = bare LM-head GEMMs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(run: dict, out_dir: Path, stem: str) -> dict:
    """Write ``stem``.json/.md and the sweep PNGs into ``out_dir``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    plots = []
    for group, axis in (("sweep-n", "n"), ("sweep-v", "v")):
        p = out_dir / f"{stem}-{group}.png"
        if plot_sweep(run, group, axis, p):
            plots.append(p.name)
            paths[group] = p
    run["plots"] = plots
    paths["json"] = out_dir / f"{stem}.json"
    paths["md"] = out_dir / f"{stem}.md"
    paths["json"].write_text(json.dumps(run, indent=1, default=str))
    paths["md"].write_text(markdown(run))
    return paths


def main(argv=None):
    """``python -m bench.report RUN.json``: recompute the ratios and rewrite the .md and PNGs."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    ap.add_argument("json", type=Path)
    args = ap.parse_args(argv)
    run = json.loads(args.json.read_text())
    for case in run["cases"]:
        derive_case(case)
    run["targets"] = targets(run["cases"], run["meta"]["device"])
    paths = write(run, args.json.parent, args.json.stem)
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
