#!/usr/bin/env bash
# Every GPU check of the kernels in one call (a session's GPU time is short): the model with the
# compiled kernels against the XLA paths, then the scan, decode-update, attention and end-to-end
# benchmarks. Each section has its own time limit so one failure or hang never loses the rest.
# The default sections take up to ~11 minutes; `bench` (the serving protocol of docs/benchmarks.md,
# up to ~9 minutes) runs only when named, so that one call stays under the device's 10-minute limit.
#
#   OUT=results_dir bash benchmarks/gpu_checks.sh                       # model scan-decode scan attention e2e
#   OUT=results_dir bash benchmarks/gpu_checks.sh model bench           # chosen sections, in this order
#   OUT=results_dir bash benchmarks/gpu_checks.sh mosaic                # or prefill, decode, scan-single, mesh-plan: one per call
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
START=$(date +%s)
section() { echo; echo "=== $1 ($(( $(date +%s) - START )) s) ==="; }

SECTIONS=${*:-model scan-decode scan attention e2e}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }

section env
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
python3 -c "import jax; print(jax.__version__, jax.devices())"

if want model; then
section "model with compiled kernels vs XLA"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 python3 -m pytest -q -p no:cacheprovider \
    tests/test_kernels_in_model.py 2>&1 | tee "$OUT/kernels_in_model.log" | tail -40
fi

if want scan-decode; then
section "scan decode update"
timeout 60 python3 benchmarks/gpu_scan_decode.py --out "$OUT/scan_decode.json" 2>&1 | tail -20
fi

if want scan; then
section "selective scan"
timeout 100 python3 benchmarks/gpu_selective_scan.py --configs 20-23 --top-k 4 --lengths 4096,65536 \
    --sequential-max-s 0.2 --budget 85 --out "$OUT/scan.json" > "$OUT/scan.log" 2>&1
tail -16 "$OUT/scan.log"
fi

if want attention; then
section attention
timeout 150 python3 benchmarks/gpu_attention.py --budget 130 --hard-limit 140 --out "$OUT/attn.json" \
    > "$OUT/attn.log" 2>&1
tail -40 "$OUT/attn.log"
fi

if want e2e; then
section "end to end"
timeout 200 python3 benchmarks/gpu_generate.py --blocks 2 --budget 170 --out "$OUT/generate.json" 2>&1 \
    | tee "$OUT/generate.log" | tail -12
fi

if want bench; then
section "serving benchmark (docs/benchmarks.md)"
timeout 540 python3 benchmarks/gpu_bench.py --budget 450 --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -30
fi
if want mosaic; then
section "Mosaic GPU int8 grouped matmul and flash prefill vs Triton, XLA, cuDNN (docs/experts_int8.md, docs/attention.md)"
timeout 470 python3 benchmarks/gpu_mosaic.py --budget-s 400 --out "$OUT/gpu_mosaic.json" 2>&1 \
    | tee "$OUT/gpu_mosaic.log" | tail -30
fi

if want scan-single; then
section "single-pass selective scan, two-pass, XLA scans, decode update (docs/selective_scan.md)"
timeout 470 python3 benchmarks/gpu_scan.py --budget-s 420 --out "$OUT/gpu_scan.json" 2>&1 \
    | tee "$OUT/gpu_scan.log" | tail -30
fi

if want decode; then
section "decode against the bandwidth floor, full Mini, batch 1-32, per-kind profile (docs/generate.md)"
timeout 480 python3 benchmarks/gpu_decode.py --budget-s 420 --out "$OUT/gpu_decode.json" 2>&1 \
    | tee "$OUT/gpu_decode.log" | tail -30
fi

if want prefill; then
section "prefill MFU, chunk sweep and a 256K prompt (docs/generate.md)"
timeout 540 python3 benchmarks/gpu_prefill.py --budget-s 450 --out "$OUT/gpu_prefill.json" 2>&1 \
    | tee "$OUT/gpu_prefill.log" | tail -30
fi

if want mesh-plan; then
section "8-GPU memory plan and decode collectives, GPU compiler on a mocked topology (docs/sharding.md)"
timeout 500 python3 benchmarks/gpu_mesh_plan.py --budget-s 420 --out "$OUT/gpu_memory_plan.json" 2>&1 \
    | tee "$OUT/gpu_mesh_plan.log" | tail -30
fi
section done
