#!/usr/bin/env bash
# The GPU items of issues 3 and 4 in one device call (about 9 minutes at most): run on a lent GPU
# machine from the repository root, where the image's python3 has torch + transformers (no set-up):
#
#     bash scripts/gpu_checks.sh "$OUT"          # results: $OUT/<name>.json and .log, $OUT/gpu.txt
#     bash scripts/gpu_checks.sh /tmp/g --smoke  # the same scripts on CPU with tiny sizes (plumbing only)
#
# 1. GPT-2-124M, batch 1, bf16, compiled fixed-shape steps, 256 new tokens (issue 4: goal 2,500 tok/s)
# 2. VLM training, CLIP ViT-B/16 + SmolLM2-135M's shape, batch 32, bf16: tokens/s and MFU next to HF LLaVA
# 3. CLIP training, ViT-B/16 + 12-layer text tower, batch 256, bf16, compiled: pairs/s, MFU vs HF (goal 2x)
# Each benchmark has its own time limit, so one that hangs does not cost the others.
set -u
OUT=${1:-runs/gpu_checks}
MODE=${2:-}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
if [ "$MODE" = "--smoke" ]; then
    DECODE=(--device cpu --batches 1 --precisions fp32 --new-tokens 8 --rounds 1)
    VLM=(--device cpu --preset tiny --batch 2 --warmup 1 --iters 1 --rounds 1)
    CLIP=(--device cpu --preset tiny --batch 8 --warmup 1 --iters 1 --rounds 1)
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
    DECODE=(--device cuda --batches 1 --precisions bf16 --compile --new-tokens 256)
    VLM=(--device cuda --preset smol --batch 32)
    CLIP=(--device cuda --preset b16 --batch 256 --compile)
fi
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__)" | tee "$OUT/versions.txt"

run() {  # name, time limit (s), script and arguments
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$PY" "$@" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc $rc, $((SECONDS - start)) s ($*)"
    grep -E '^\|' "$OUT/$name.log" || tail -n 20 "$OUT/$name.log"
}
run decode_gpt2 150 benchmarks/bench_decode.py --model gpt2 "${DECODE[@]}"
run vlm_smol 150 benchmarks/bench_vlm.py "${VLM[@]}"
run clip_b16 240 benchmarks/bench_clip.py "${CLIP[@]}"
