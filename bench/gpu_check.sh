#!/usr/bin/env bash
# The one prepared GPU run (about 5 minutes on an H100/H200): versions, the kernel tests on the
# device, the headline N=8192 (8x1024) H=4096 V=151936 bf16 against every peer on peaked, zipf
# and flat inputs, one sequence of T=16384 tokens, the fused kernels alone (errors, reruns,
# fraction of tiles skipped, floor on the real dz), a kernel-time profile of one step, and a
# short table printed last. Every part has its own time limit and writes its results as it goes,
# so a failing or slow part never hides the others.
#
#   bash bench/gpu_check.sh OUT_DIR          # on a CUDA machine
#   bash bench/gpu_check.sh OUT_DIR --smoke  # anywhere: tiny shapes, CPU under the interpreter
#
# Files in OUT_DIR: versions.txt, tests.txt, <date>-cuda-<gpu>[-t16k].json/.md (bench),
# fused.json, fused.md, profile.txt, log.txt. On the lent machine torch/triton are never
# reinstalled; liger-kernel and cut-cross-entropy come as wheels in .whl/ and go to /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench/results/gpu}}
SMOKE=${2:-}
mkdir -p "$OUT"
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
exec > >(tee -a "$OUT/log.txt") 2>&1
t0=$SECONDS
stamp() { echo "---- [$((SECONDS - t0)) s] $*"; }

stamp versions
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python3 - <<'EOF'
import importlib.metadata as m
for d in ("liger-kernel", "cut-cross-entropy", "trl", "transformers"):
    try:
        print(d, m.version(d))
    except m.PackageNotFoundError:
        print(d, "not installed")
EOF
} 2>&1 | tee "$OUT/versions.txt"

PEERS=gemm_floor,opo_triton,opo_fused,naive_opo_compile,liger_triton_grpo,cce_opo,trl_chunked_opo,torch_linear_ce_opo
if [ "$SMOKE" = "--smoke" ]; then
  export TRITON_INTERPRET=1
  DEV=cpu
  HEAD=(--device cpu --shape 2,64,64,2000 --repeats 1 --inputs all
        --methods gemm_floor,opo_torch,naive_opo,trl_chunked_opo,torch_linear_ce_opo)
  LONG=(--device cpu --shape 1,512,64,1000 --repeats 1 --inputs peaked
        --methods gemm_floor,opo_torch,trl_chunked_opo)
  FUSED=(--n 48 --h 32 --v 300)
  TESTS=(tests/test_fused_linear.py -k "forward_bf16 or waves")
  PROF_METHODS=opo_torch
  SLOW=4  # time limits x4: the interpreter on a shared CPU
else
  DEV=cuda
  HEAD=(--device cuda --preset gpu-headline --inputs all --methods "$PEERS")
  LONG=(--device cuda --shape 1,16384,4096,151936 --inputs peaked
        --methods gemm_floor,opo_triton,opo_fused,naive_opo_compile,trl_chunked_opo)
  FUSED=()
  TESTS=(tests/test_vocab_triton.py tests/test_fused_linear.py)
  PROF_METHODS=opo_triton,opo_fused
  SLOW=1
fi

# 1. Kernel tests on the device (real compilation; no interpreter on a GPU).
stamp tests
timeout $((40 * SLOW)) python3 -m pytest -q -p no:cacheprovider --maxfail=20 "${TESTS[@]}" 2>&1 \
  | tail -40 > "$OUT/tests.txt"
tail -5 "$OUT/tests.txt"

# 2. Headline, every peer, peaked / zipf / flat inputs.
stamp bench headline
timeout $((120 * SLOW)) python3 -m bench "${HEAD[@]}" --sweep none --out "$OUT" 2>&1 | grep -v "^|" | tail -30

# 3. One sequence of T=16384 tokens (sequence-level loss over a sequence longer than a chunk).
stamp bench one long sequence
timeout $((45 * SLOW)) python3 -m bench "${LONG[@]}" --sweep none --tag t16k --out "$OUT" 2>&1 \
  | grep -v "^|" | tail -12

# 4. The fused kernels alone: exact / bf16 accumulation / filtered on peaked, zipf, flat inputs;
#    errors against fp32 and the bf16 peers, bitwise reruns, tiles skipped, floor on real dz.
stamp fused
timeout $((60 * SLOW)) python3 bench/gpu_check_fused.py "$OUT/fused.json" "${FUSED[@]}" 2>&1 | tail -8
python3 bench/gpu_check_fused.py --report "$OUT/fused.json" > "$OUT/fused.md" 2>&1

# 5. Where one step's time goes: kernel times of one forward+backward per method (peaked).
stamp profile
timeout $((30 * SLOW)) python3 - "$DEV" "$PROF_METHODS" "$SMOKE" > "$OUT/profile.txt" 2>&1 <<'EOF'
import sys
import torch
from torch.profiler import ProfilerActivity, profile
from bench.cases import PRESETS, Shape, get_method, make_inputs
dev, names, smoke = sys.argv[1], sys.argv[2].split(","), sys.argv[3:] == ["--smoke"]
shape = Shape(1, 64, 32, 500, "float32") if smoke else PRESETS["gpu-headline"]
x = make_inputs(shape, "peaked", dev)
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
key = "cuda_time_total" if dev == "cuda" else "cpu_time_total"
for name in names:
    step = get_method(name).build(x)
    for _ in range(2):
        x.zero_grad(); step()
    if dev == "cuda":
        torch.cuda.synchronize()
    x.zero_grad()
    with profile(activities=acts) as prof:
        step()
        if dev == "cuda":
            torch.cuda.synchronize()
    print(f"== {name}: {shape.label()} peaked, one forward+backward")
    print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))
EOF
grep -E "^==|Self CUDA time total|Self CPU time total" "$OUT/profile.txt" | head -8

stamp summary
head -4 "$OUT/versions.txt"
grep -E "passed|failed|error" "$OUT/tests.txt" | tail -2
python3 - "$OUT" <<'EOF'
import glob
import json
import sys
out = sys.argv[1]
for path in sorted(glob.glob(f"{out}/*-*.json")):
    run = json.load(open(path))
    for c in run.get("cases", []):
        floor = next((m.get("time_s") for m in c["methods"] if m["name"] == "gemm_floor"), None)
        print(f"{c['label']} {c['inputs']} (entropy {c['entropy']:.2f})")
        for m in c["methods"]:
            t, pk = m.get("time_s"), m.get("peak_bytes")
            print(f"  {m['name']:20s} " + (f"{t*1e3:8.1f} ms {t/floor:5.2f}x  {pk/2**20:9.1f} MiB"
                  if t and floor and pk is not None else m["status"][:90]))
try:
    f = json.load(open(f"{out}/fused.json"))
    print("fused x floor:", {k: round(v, 3) for k, v in f["ratio_to_floor"].items()})
    print("fused MiB:", f["mem_above_inputs_and_grads_mib"])
    print("fused tiles skipped:", f["skipped_tiles"], "errors:", list(f["errors"]))
except Exception as e:
    print("fused.json:", e)
EOF
stamp done
