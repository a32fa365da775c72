#!/usr/bin/env bash
# One command for a lent GPU machine: rebuild pagedllm._C against its torch, run the CUDA tests, every
# kernel benchmark and an end-to-end run, then print a short table last.
# One device command may run 600 s, so every stage runs inside ONE deadline (GPU_CHECK_DEADLINE seconds
# from the start, default 530): a stage gets what is left of it (minus the reserve for the archive and the
# table), never more than its own cap, and is skipped when too little is left.
# What comes back: $OUT/gpu_check_logs.tar.gz (every log), $OUT/table.md, and this script's stdout.
# Typical H100 times: build 2-3 min (16 jobs), tests ~1 min, kernel benchmarks ~2 min, end to end ~1 min.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
logs=$(mktemp -d)
start=$(date +%s)
deadline=$(( start + ${GPU_CHECK_DEADLINE:-530} ))
reserve=20  # seconds kept for the archive and the table
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PAGEDLLM_TARGET=cuda
[ -n "${CUDA_HOME:-}" ] || { [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda; }
# The CUDA tests: collected with -m cuda (they need no gguf or transformers: tests/test_gpu_check.py).
CUDA_TESTS="tests/kernels tests/engine/test_cuda_graph.py tests/engine/test_kv_cache_profile.py tests/engine/test_cuda_paths.py"

# stage NAME CAP CMD...: CMD with a timeout of min(CAP, time left - reserve), output in $logs/NAME.log.
stage() {
  local name=$1 cap=$2 t
  shift 2
  t=$(( deadline - $(date +%s) - reserve ))
  (( t > cap )) && t=$cap
  if (( t < 10 )); then
    echo "$name: skipped (the ${GPU_CHECK_DEADLINE:-530} s deadline is near)" | tee "$logs/$name.log"
    return 124
  fi
  timeout "$t" "$@" >"$logs/$name.log" 2>&1
}

finish() {
  echo "total: $(( $(date +%s) - start )) s; cuda tests rc=${tests_rc:-not run}"
  tar -czf "$out/gpu_check_logs.tar.gz" -C "$logs" . 2>/dev/null
  rm -rf "$logs"
  python scripts/results_table.py "$out/results.jsonl" >"$out/table.md" 2>/dev/null
  rm -f "$out/results.jsonl"
  cat "$out/table.md"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$logs/device.txt"
: >"$out/results.jsonl"
if ! stage build 300 pip install --no-build-isolation --no-deps -e .; then
  tail -40 "$logs/build.log"; echo "gpu_check: build failed"; finish; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
grep -E "ptxas info *: (Used|Compiling)|spill" "$logs/build.log" >"$logs/ptxas.txt" || true
python -m pagedllm.env >"$logs/env.txt" 2>&1
# `pagedllm serve` needs fastapi and uvicorn; GPU images often lack them and have no network to fetch them.
if ! python -c "import fastapi, uvicorn" 2>/dev/null; then
  if stage serve_deps 60 pip install --retries 0 --timeout 10 fastapi uvicorn; then
    echo "serve: installed fastapi and uvicorn"
  else
    echo "serve: fastapi / uvicorn are missing and could not be installed: \`pagedllm serve\` does not run on this image"
  fi
fi

# First each PTX twin of the emulator (csrc/cuda/ptx.cuh) against the real instruction, one micro-kernel each:
# if a twin is wrong, every emulated result CI trusts is suspect.
stage ptx_twins 60 python -m pytest -m cuda tests/kernels/test_ptx_twins.py -q -p no:cacheprovider
tail -3 "$logs/ptx_twins.log"
# shellcheck disable=SC2086
stage tests 240 python -m pytest -m cuda $CUDA_TESTS -q -x -p no:cacheprovider
tests_rc=$?
tail -3 "$logs/tests.log"

for bench in benchmarks/kernels/bench_*.py; do
  name=$(basename "$bench" .py)
  stage "$name" 120 python "$bench" --device cuda || echo "$bench failed or skipped (rc $?)"
  grep -h '^RESULT ' "$logs/$name.log" | sed 's/^RESULT //' >>"$out/results.jsonl"
done
# End to end, issue 5's workload: 256 prompts (100..1024 random tokens, 100..1024 outputs, temperature 0.6,
# ignore_eos) on random bf16 weights with Qwen3-0.6B's config. Decode steps replay CUDA graphs.
stage throughput 240 python benchmarks/throughput.py --device cuda --model benchmarks/configs/qwen3-0.6b \
  --load-format dummy --num-prompts 256 --concurrency 256 --min-input 100 --max-input 1024 --min-output 100 \
  --max-output 1024 --temperature 0.6 --max-model-len 4096 --skip-hf || echo "throughput failed or skipped (rc $?)"
grep -h '^RESULT ' "$logs/throughput.log" | sed 's/^RESULT //' >>"$out/results.jsonl"
# transformers' generate on the same kind of workload, scaled down (opt-in; only if the deadline leaves time).
if [ -n "${GPU_CHECK_HF:-}" ]; then
  stage throughput_hf 300 python benchmarks/throughput.py --device cuda --model benchmarks/configs/qwen3-0.6b \
    --load-format dummy --num-prompts 64 --concurrency 64 --min-input 100 --max-input 1024 --min-output 100 \
    --max-output 512 --temperature 0.6 --max-model-len 4096 || echo "throughput vs transformers failed or skipped (rc $?)"
  grep -h '^RESULT ' "$logs/throughput_hf.log" | sed 's/^RESULT //' >>"$out/results.jsonl"
fi
# Multi-GPU (issue 14), only when at least 2 GPUs are visible: the tensor-parallel tests over NCCL (the tiny
# models of tests/distributed on cuda), then TP 1 vs 2 (and 4 with 4 GPUs) on the Qwen3-0.6B-config workload
# (random bf16 weights; TP steps run eagerly, without decode graphs).
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
if [ "$gpus" -ge 2 ]; then
  tps="1 2"
  [ "$gpus" -ge 4 ] && tps="1 2 4"
  stage tp_tests 180 python -m pytest tests/distributed -q -x -p no:cacheprovider || echo "tp tests failed (rc $?)"
  tail -3 "$logs/tp_tests.log"
  # shellcheck disable=SC2086
  stage tp 240 python benchmarks/tp.py --device cuda --model benchmarks/configs/qwen3-0.6b --load-format dummy \
    --tp $tps --num-prompts 256 --min-input 100 --max-input 1024 --max-output 256 --max-model-len 4096 \
    || echo "tp benchmark failed or skipped (rc $?)"
  grep -h '^RESULT ' "$logs/tp.log" | sed 's/^RESULT //' >>"$out/results.jsonl"
fi
finish
