#!/usr/bin/env bash
# The one prepared GPU run: versions, the kernel tests on the GPU, the headline benchmark, the
# fused kernels' errors and tile sweep, the trainer's step. Every part has its own time limit and
# writes its results as it goes, so a failing or slow part never hides the others.
#
#   bash bench/gpu_check.sh OUT_DIR          # on a CUDA machine (~5 minutes on an H100/H200)
#   bash bench/gpu_check.sh OUT_DIR --smoke  # anywhere: tiny shapes, CPU under the interpreter
#
# At most 8 files land in OUT_DIR: versions.txt, tests.txt, <date>-cuda-<gpu>.json/.md (bench),
# fused.json, trainer.json, log.txt. On the lent machine torch/triton are never reinstalled;
# liger-kernel and cut-cross-entropy come as wheels in .whl/ and go to /tmp/site.
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
  python3 -c "import importlib.metadata as m; print(*[f'{d} {m.version(d)}' for d in ('liger-kernel', 'cut-cross-entropy', 'transformers')])"
} 2>&1 | tee "$OUT/versions.txt"

if [ "$SMOKE" = "--smoke" ]; then
  export TRITON_INTERPRET=1
  BENCH=(--device cpu --quick --sweep none --inputs peaked --methods gemm_floor,opo_torch,naive_opo)
  FUSED=(--n 48 --h 32 --v 300)
  TRAINER=(--device cpu --steps 2 --vocab 4096 --hidden 192 --new-tokens 8)
  TESTS=(tests/test_fused_linear.py -k "forward_bf16 or bitwise")
else
  BENCH=(--device cuda --preset gpu-headline --sweep none --inputs both)
  FUSED=(--sweep)
  TRAINER=(--device cuda --steps 4)
  TESTS=(tests/test_vocab_triton.py tests/test_fused_linear.py tests/test_losses.py -k "not native")
fi

# 1. Kernel tests on the device (real compilation; no interpreter on a GPU).
stamp tests
timeout 110 python3 -m pytest -q -p no:cacheprovider --maxfail=20 "${TESTS[@]}" 2>&1 \
  | tail -40 > "$OUT/tests.txt"
tail -15 "$OUT/tests.txt"

# 2. Headline: N=8192 H=4096 V=151936 bf16, every method, peaked and flat inputs.
stamp bench
timeout 200 python3 -m bench "${BENCH[@]}" --out "$OUT" 2>&1 | grep -v "^|" | tail -40

# 3. The fused kernels alone: filtered/exact/deterministic/bf16-accumulation, errors against fp32
#    and against the bf16 peers, bitwise reruns, batch invariance, tile and threshold sweeps.
stamp fused
timeout 150 python3 bench/gpu_check_fused.py "$OUT/fused.json" "${FUSED[@]}" 2>&1 | tail -45

# 4. The trainer's step, toy task on a scaled-up model: fused vs materializing loss head.
stamp trainer
timeout 150 python3 -m bench.trainer_step "${TRAINER[@]}" --out "$OUT/trainer.json" 2>&1 \
  | grep -E "^\{|Error|error" | tail -8

stamp summary
head -4 "$OUT/versions.txt"
grep -E "passed|failed|error" "$OUT/tests.txt" | tail -2
python3 - "$OUT" <<'EOF'
import json, sys, glob
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
    print("fused MiB:", f["mem_above_inputs_and_grads_mib"], "errors:", list(f["errors"]))
except Exception as e:
    print("fused.json:", e)
EOF
stamp done
