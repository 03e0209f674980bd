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
        if r.get("peak_bytes") is not None:
            # to one fp32 N x V logits tensor, a floor of any materializing loss's peak (where the
            # naive loss is too big to run, this bounds the ratio to it from above)
            r["x_logits_mem"] = r["peak_bytes"] / (4 * case["N"] * case["V"])


# Targets at the headline shape, on the CPU and on the GPU.
LIMITS = {"cpu": {"x_floor": 1.05, "x_liger": 0.5, "x_naive_mem": 0.25},
          "cuda": {"x_floor": 1.3, "x_liger": 1 / 3, "x_liger_mem": 1 / 20}}


def targets(cases: list, device: str) -> list:
    """The targets' ratios for the auto backend (and the fused one on CUDA) at the headline
    shape, per inputs kind: time to the floor and to Liger's chunked GRPO, memory to the naive
    loss and to Liger's, time to Liger's Triton GRPO and to the naive loss under torch.compile."""
    out = []
    names = (AUTO_METHOD[device], "opo_fused") if device == "cuda" else (AUTO_METHOD[device],)
    for c in cases:
        if c["group"] != "headline":
            continue
        rows = {r["name"]: r for r in c["methods"]}

        def ratio(r, other, key):
            o = rows.get(other)
            if r["status"] != "ok" or o is None or o["status"] != "ok" or not o.get(key):
                return None
            return r[key] / o[key]
        for name in names:
            r = rows.get(name)
            if r is None:
                continue
            ok = r["status"] == "ok"
            out.append({
                "inputs": c["inputs"], "method": name, "status": r["status"],
                "x_floor": r.get("x_floor") if ok else None,
                "x_floor_min": r.get("x_floor_min") if ok else None,
                "x_liger": ratio(r, "liger_grpo_chunked", "time_s"),
                "x_liger_min": ratio(r, "liger_grpo_chunked", "min_s"),
                "x_naive_mem": r.get("x_naive_mem") if ok else None,
                "x_liger_mem": ratio(r, "liger_grpo_chunked", "peak_bytes"),
                "x_liger_triton": ratio(r, "liger_triton_grpo", "time_s"),
                "x_naive_compile": ratio(r, "naive_opo_compile", "time_s"),
            })
    return out


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def case_table(case: dict) -> str:
    rows = ["| method | status | fwd+bwd median (ms) | x floor | best (ms) | x floor (best) "
            "| peak above inputs+grads (MiB) | x naive mem | x fp32 logits | loss |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in case["methods"]:
        t, pb, tm = r.get("time_s"), r.get("peak_bytes"), r.get("min_s")
        rows.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["name"], r["status"], _fmt(None if t is None else t * 1e3, ".1f"),
            _fmt(r.get("x_floor"), ".2f"), _fmt(None if tm is None else tm * 1e3, ".1f"),
            _fmt(r.get("x_floor_min"), ".2f"), _fmt(None if pb is None else pb / MiB, ".1f"),
            _fmt(r.get("x_naive_mem"), ".3f"), _fmt(r.get("x_logits_mem"), ".3f"),
            _fmt(r.get("loss"), ".5f")))
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


# The targets table's columns per device: (header, [(ratio key, limit key or None), ...]); a
# column of several keys shows them as "median / best".
TARGET_COLUMNS = {
    "cuda": [("x floor (<= 1.3)", [("x_floor", "x_floor")]),
             ("x Liger chunked time (<= 0.33)", [("x_liger", "x_liger")]),
             ("x Liger chunked memory (<= 0.05)", [("x_liger_mem", "x_liger_mem")]),
             ("x Liger Triton time", [("x_liger_triton", None)]),
             ("x naive compiled time", [("x_naive_compile", None)])],
    "cpu": [("x floor (<= 1.05): median / best", [("x_floor", "x_floor"),
                                                   ("x_floor_min", "x_floor")]),
            ("x Liger chunked time (<= 0.5): median / best", [("x_liger", "x_liger"),
                                                              ("x_liger_min", "x_liger")]),
            ("x naive peak memory (<= 0.25)", [("x_naive_mem", "x_naive_mem")])],
}


def targets_table(run: dict) -> str:
    if not run.get("targets"):
        return ""
    device = run["meta"]["device"]
    lim, columns = LIMITS[device], TARGET_COLUMNS[device]

    def cell(v, key):
        if v is None:
            return "n/a"
        if key is None:
            return f"{v:.3f}"
        return f"{v:.3f} {'ok' if v <= lim[key] else 'MISSED'}"
    rows = ["| inputs | method | " + " | ".join(h for h, _ in columns) + " |",
            "|---|---|" + "---:|" * len(columns)]
    for t in run["targets"]:
        cells = [" / ".join(cell(t.get(k), lk) for k, lk in keys) for _, keys in columns]
        rows.append(f"| {t['inputs']} | {t['method']} | " + " | ".join(cells) + " |")
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
        out += ["### Targets at the headline shape", "", targets_table(run), ""]
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
    return _save(fig, path, f"{run['meta']['device_name']}: sweep over {key} ({fixed}, "
                 f"{c0['dtype']}, {c0['inputs']} inputs; floor = bare LM-head GEMMs)")


def _save(fig, path: Path, title: str) -> bool:
    """Title, layout, PNG at ``path``; the figure closed."""
    import matplotlib.pyplot as plt
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_t_sweep(run: dict, path: Path) -> bool:
    """x floor (median) and peak memory against the tokens per sequence T, one line per method
    and V."""
    cases = [c for c in run["cases"] if c["group"] == "sweep-t"]
    if len(cases) < 2:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    vs = sorted({c["V"] for c in cases})
    names = [r["name"] for r in cases[0]["methods"] if r["name"] != "gemm_floor"]
    for k, V in enumerate(vs):
        cs = sorted((c for c in cases if c["V"] == V), key=lambda c: c["T"])
        for j, name in enumerate(names):
            pts = [(c["T"], next(r for r in c["methods"] if r["name"] == name)) for c in cs]
            pts = [(t, r) for t, r in pts if r["status"] == "ok" and r.get("x_floor")]
            if not pts:
                continue
            style = dict(color=f"C{j}", marker="os^vD"[k % 5], ls=("-", "--", ":")[k % 3])
            label = f"{name}, V={V}"
            ax_t.plot([t for t, _ in pts], [r["x_floor"] for _, r in pts], label=label, **style)
            ax_m.plot([t for t, _ in pts], [max(r["peak_bytes"], 1) / MiB for _, r in pts],
                      label=label, **style)
    ax_t.axhline(1.0, color="k", lw=1)
    ax_t.axhline(1.10, color="r", lw=1, ls=":", label="1.10x floor")
    ax_t.set_ylabel("forward+backward time / GEMM floor (median)")
    ax_m.set_ylabel("peak above inputs and gradients (MiB)")
    ax_m.set_yscale("log")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per sequence T")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    c0 = cases[0]
    return _save(fig, path, f"{run['meta']['device_name']}: sweep over T (N = max(headline N, T), "
                 f"H={c0['H']}, {c0['dtype']}, {c0['inputs']} inputs)")


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
    p = out_dir / f"{stem}-sweep-t.png"
    if plot_t_sweep(run, p):
        plots.append(p.name)
        paths["sweep-t"] = p
    run["plots"] = plots
    paths["json"] = out_dir / f"{stem}.json"
    paths["md"] = out_dir / f"{stem}.md"
    paths["json"].write_text(json.dumps(run, indent=1, default=str))
    paths["md"].write_text(markdown(run))
    return paths


def readme_table(run: dict, source: str, group: str = "headline") -> str:
    """The README's compact table of a run's cases in ``group`` (time x floor and peak memory
    per method: one column group per inputs kind, or per V / N in a sweep), generated, never
    typed."""
    cases = [c for c in run["cases"] if c["group"] == group]
    if not cases:
        return ""

    def name(c):
        return {"sweep-v": f"V={c['V']}", "sweep-n": f"N={c['N']}",
                "sweep-t": f"{c['B']}x{c['T']} V={c['V']}"}.get(group, c["inputs"])
    head = "| method | " + " | ".join(f"{name(c)}: ms | x floor | MiB" for c in cases) + " |"
    rows = [head, "|---|" + "---:|---:|---:|" * len(cases)]
    for i, r0 in enumerate(cases[0]["methods"]):
        cells = []
        for c in cases:
            r = c["methods"][i]
            if r["status"] != "ok":
                cells.append(f"{r['status'][:40]} | | ")
                continue
            cells.append(f"{r['time_s'] * 1e3:.1f} | {r['x_floor']:.2f} | "
                         f"{r['peak_bytes'] / MiB:.0f}")
        rows.append(f"| {r0['name']} | " + " | ".join(cells) + " |")
    m = run["meta"]
    shape = cases[0]["label"] if group == "headline" else \
        f"H={cases[0]['H']} {cases[0]['dtype']}, {cases[0]['inputs']} inputs, B sequences x T " \
        "tokens per column" if group == "sweep-t" else \
        f"N={cases[0]['N']} H={cases[0]['H']} {cases[0]['dtype']}, {cases[0]['inputs']} inputs"
    return (f"{m['device_name']}, {shape}, {m['timing']}; memory = peak above inputs "
            f"and gradients. From `{source}` (`{m['command']}`).\n\n" + "\n".join(rows))


README_BEGIN, README_END = "<!-- bench:{}:begin -->", "<!-- bench:{}:end -->"


def update_readme(readme: Path, key: str, text: str) -> None:
    """Replace the block between the README's ``bench:<key>`` markers with ``text``."""
    body = readme.read_text()
    b, e = README_BEGIN.format(key), README_END.format(key)
    i, j = body.find(b), body.find(e)
    if i < 0 or j < i:
        raise SystemExit(f"{readme}: markers {b} ... {e} not found")
    readme.write_text(body[:i + len(b)] + "\n" + text + "\n" + body[j:])


def main(argv=None):
    """``python -m bench.report RUN.json [--readme README.md --key NAME]``: recompute the ratios,
    rewrite the .md and PNGs, and optionally the README block between ``bench:NAME`` markers."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    ap.add_argument("json", type=Path)
    ap.add_argument("--readme", type=Path, help="README whose marked block gets the table")
    ap.add_argument("--key", default="gpu", help="marker name of the README block")
    ap.add_argument("--group", default="headline", help="cases of the README table: headline | "
                                                         "sweep-v | sweep-n | sweep-t")
    args = ap.parse_args(argv)
    run = json.loads(args.json.read_text())
    for case in run["cases"]:
        derive_case(case)
    run["targets"] = targets(run["cases"], run["meta"]["device"])
    paths = write(run, args.json.parent, args.json.stem)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if args.readme:
        update_readme(args.readme, args.key, readme_table(run, args.json.as_posix(), args.group))
        print(f"updated {args.readme} (bench:{args.key})")


if __name__ == "__main__":
    main()
