#!/usr/bin/env bash
# One command for a lent GPU machine: rebuild pagedllm._C against its torch, run the CUDA tests,
# then every kernel benchmark, and print a short table last. Logs go to $OUT (or /tmp/gpu_check).
# Budget: under 8 minutes on an H100 (build ~2-3 min with 16 jobs, tests ~1 min, kernel benchmarks ~2 min,
# end to end ~1 min; GPU_CHECK_HF=1 adds transformers' generate on 64 prompts, 2-4 min).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PAGEDLLM_TARGET=cuda
[ -n "${CUDA_HOME:-}" ] || { [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda; }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/device.txt"
start=$(date +%s)
if ! pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1; then
  tail -40 "$out/build.log"; echo "gpu_check: build failed"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
grep -E "ptxas info *: (Used|Compiling)|spill" "$out/build.log" >"$out/ptxas.txt" || true
python -m pagedllm.env | tee "$out/env.txt"

timeout 240 python -m pytest -m cuda tests/kernels tests/engine/test_cuda_graph.py -q -x -p no:cacheprovider >"$out/tests.log" 2>&1
tests_rc=$?
tail -3 "$out/tests.log"

: >"$out/results.jsonl"
for bench in benchmarks/kernels/bench_*.py; do
  timeout 120 python "$bench" --device cuda >"$out/$(basename "$bench" .py).log" 2>&1 || echo "$bench failed (rc $?)"
  grep -h '^RESULT ' "$out/$(basename "$bench" .py).log" | sed 's/^RESULT //' >>"$out/results.jsonl"
done
# End to end, issue 5's workload: 256 prompts (100..1024 random tokens, 100..1024 outputs, temperature 0.6,
# ignore_eos) on random bf16 weights with Qwen3-0.6B's config.
# Decode steps replay CUDA graphs (the default; --enforce-eager would turn them off).
timeout 240 python benchmarks/throughput.py --device cuda --model benchmarks/configs/qwen3-0.6b --load-format dummy \
  --num-prompts 256 --concurrency 256 --min-input 100 --max-input 1024 --min-output 100 --max-output 1024 \
  --temperature 0.6 --max-model-len 4096 --skip-hf >"$out/throughput.log" 2>&1 || echo "throughput failed (rc $?)"
grep -h '^RESULT ' "$out/throughput.log" | sed 's/^RESULT //' >>"$out/results.jsonl"
# transformers' generate on the same kind of workload, scaled to fit the time (opt-in: +2-4 min).
if [ -n "${GPU_CHECK_HF:-}" ]; then
  timeout 300 python benchmarks/throughput.py --device cuda --model benchmarks/configs/qwen3-0.6b --load-format dummy \
    --num-prompts 64 --concurrency 64 --min-input 100 --max-input 1024 --min-output 100 --max-output 512 \
    --temperature 0.6 --max-model-len 4096 >"$out/throughput_hf.log" 2>&1 || echo "throughput vs transformers failed (rc $?)"
  grep -h '^RESULT ' "$out/throughput_hf.log" | sed 's/^RESULT //' >>"$out/results.jsonl"
fi
echo "total: $(( $(date +%s) - start )) s; cuda tests rc=$tests_rc"
python scripts/results_table.py "$out/results.jsonl" | tee "$out/table.md"
