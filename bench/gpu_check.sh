#!/usr/bin/env bash
# The one prepared GPU run: versions, the kernel tests on the GPU, the headline benchmarks.
# Usage: bash bench/gpu_check.sh OUT_DIR        (results land in OUT_DIR; ~6 minutes on an H100)
# On the lent machine: never reinstall torch/triton; liger-kernel and cut-cross-entropy come as
# wheels in .whl/ (copied from shared/wheels) and are installed into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench/results/gpu}}
mkdir -p "$OUT"
export PYTHONPATH=".:${PYTHONPATH:-}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/versions.txt"

# 1. Kernel tests on the GPU (real compilation, no interpreter): ~1-2 min.
timeout 200 python3 -m pytest -q -x tests/test_vocab_triton.py tests/test_fused_linear.py \
  tests/test_losses.py -k "not native" 2>&1 | tail -25 | tee "$OUT/tests.txt"

# 2. Headline: SPEC §7 GPU shape, every method, peaked and flat inputs: ~2 min.
timeout 200 python3 -m bench --device cuda --preset gpu-headline --sweep none --inputs both \
  --out "$OUT" 2>&1 | tail -40 | tee "$OUT/bench.txt"

# 3. The fully fused path on its own (filtered vs exact, errors vs fp32): ~1 min.
timeout 120 python3 bench/gpu_check_fused.py "$OUT/fused.json" 2>&1 | tail -25 | tee "$OUT/fused.txt"

echo "==== summary ===="
cat "$OUT/versions.txt" | head -3
grep -E "passed|failed|error" "$OUT/tests.txt" | tail -1
ls "$OUT"/*.md 2>/dev/null | head -1 | xargs -r cat | head -30
tail -12 "$OUT/fused.txt"
