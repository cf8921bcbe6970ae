#!/usr/bin/env bash
# One prepared accelerator run: mask-update cost and step overhead on the GPU.
# Usage: OUT=dir bash benchmarks/gpu_check.sh   (JSON and PNG land in $OUT)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax; print(jax.__version__, jax.devices())"
# Every method side by side (sort, bisect, histogram, and what "auto" picks).
python3 -m benchmarks.mask_update --sizes 1e5 1e6 1e7 3e7 1e8 --repeats 7 \
  --out "$OUT/mask_update_gpu.json" --plot "$OUT/mask_update_gpu.png" 2>&1 | grep -v 'it/s\|s/it'
# adam; the in-step lax.cond (bool and packed masks); update_masks=False (no conditional).
python3 -m benchmarks.step_overhead --repeats 200 --batch-size 512 --compile-thresholds \
  --out "$OUT/step_overhead_gpu.json"
# Sparse training (SET, RigL, static, STE) beside gradual pruning, in-step and static steps.
python3 -m benchmarks.step_overhead --sparse-training --repeats 200 --batch-size 512 \
  --out "$OUT/step_overhead_sparse_gpu.json"
# Shrunk models: forward time of the dense and the channel-pruned, shrunk models (short training).
python3 -m benchmarks.shrink --quick --repeats 50 \
  --out "$OUT/shrink_gpu.json" --plot "$OUT/shrink_gpu.png" 2>&1 | grep -v 'it/s\|s/it'
# A ResNet-50 with literal widths pruned one-shot, shrunk, run through Shrunk.apply (224x224, batch 8).
python3 -m benchmarks.shrink_resnet50 --repeats 30 \
  --out "$OUT/shrink_resnet50_gpu.json" 2>&1 | grep -v 'it/s\|s/it\|round/s'
# Compile time of the train step against adam's at depth (fresh process each; 120 s limit each).
python3 -m benchmarks.compile_time --repeats 20 --limit 120 \
  --out "$OUT/compile_time_gpu.json" --plot "$OUT/compile_time_gpu.png" 2>&1 | grep -v 'it/s\|s/it'
