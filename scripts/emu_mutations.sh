#!/usr/bin/env bash
# A test of the tests: applies seeded bugs to the CUDA kernels one at a time, rebuilds only the
# CUDA emulator library (_C_emu), and runs the kernel tests' cuda_emu variants against it. Each
# bug must make a test fail ("caught"); the script exits 1 if one is not caught. The sources are
# restored after every mutation (and on exit).
#   usage: bash scripts/emu_mutations.sh [build dir] [name filter]   (build dir default: $PAGEDLLM_BUILD_DIR
#          or build/cmake-cuda, an existing setup.py build directory; the filter, a grep -E pattern,
#          picks mutations by name)
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${1:-${PAGEDLLM_BUILD_DIR:-build/cmake-cuda}}
[ -f "$BUILD_DIR/CMakeCache.txt" ] || { echo "no CMake build in $BUILD_DIR: run setup.py first"; exit 2; }
OUT_DIR=$(sed -n 's/^PAGEDLLM_OUTPUT_DIR:PATH=//p' "$BUILD_DIR/CMakeCache.txt")
export PAGEDLLM_CUDA_EMU_LIBRARY="$OUT_DIR/_C_emu.so"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}

# name | file | text to replace | replacement | tests (pytest args); "\n" in the texts is a line break
MUTATIONS=(
"missing __syncwarp after the cp.async wait (decode)|csrc/cuda/attention_decode_kernels.cu|    __syncwarp();                    // ... and every lane's copies are visible to the warp|    // (mutation: no __syncwarp)|tests/kernels/test_attention_decode.py"
"cp.async wait_group off by one (decode)|csrc/cuda/attention_decode_kernels.cu|cp_async_wait<kStages - 1>();|cp_async_wait<kStages>();|tests/kernels/test_attention_decode.py"
"wrong shuffle offset in warp_sum|csrc/cuda/reduce.cuh|for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync|for (int offset = 8; offset > 0; offset >>= 1) v += __shfl_xor_sync|tests/kernels/test_layernorm.py"
"swapped ldmatrix address halves of the Q fragment (prefill)|csrc/cuda/attention_prefill_kernels.cu|sQ + (warp_row0 + lr + (lj & 1) * 8) * LDS + (lj >> 1) * 8|sQ + (warp_row0 + lr + (lj >> 1) * 8) * LDS + (lj & 1) * 8|tests/kernels/test_attention_prefill.py"
"mis-packed P fragment (prefill)|csrc/cuda/attention_prefill_kernels.cu|pa[mi][kk][1] = pack2<T>(s[mi][2 * kk][2], s[mi][2 * kk][3]);|pa[mi][kk][1] = pack2<T>(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);|tests/kernels/test_attention_prefill.py"
"missing __syncthreads before the V tile is read (prefill)|csrc/cuda/attention_prefill_kernels.cu|    __syncthreads();  // V tile t landed for all threads; every warp is done reading K tile t|    // (mutation: no __syncthreads)|tests/kernels/test_attention_prefill.py"
"split-KV merge drops the last partition (decode)|csrc/cuda/attention_decode_kernels.cu|(end - 1) / a.partition_size - start / a.partition_size + 1, a.num_partitions)|(end - 1) / a.partition_size - start / a.partition_size, a.num_partitions)|tests/kernels/test_attention_decode.py"
"missing __syncthreads in block_sum|csrc/cuda/reduce.cuh|  if (lane == 0) scratch[warp] = v;\n  __syncthreads();\n  v = lane < num_warps ? scratch[lane] : 0.f;|  if (lane == 0) scratch[warp] = v;\n  v = lane < num_warps ? scratch[lane] : 0.f;|tests/kernels/test_layernorm.py"
)

# Originals are kept aside and copied back (uncommitted edits survive).
SAVED=$(mktemp -d)
cp -p csrc/cuda/*.cu csrc/cuda/*.cuh "$SAVED"/
restore() { for f in "$SAVED"/*; do cmp -s "$f" "csrc/cuda/$(basename "$f")" || cp "$f" "csrc/cuda/"; done; }  # new mtime: ninja rebuilds
trap 'restore; rm -rf "$SAVED"' EXIT

build() { cmake --build "$BUILD_DIR" --target _C_emu -j "${MAX_JOBS:-2}" >/tmp/emu_mutation_build.log 2>&1; }

missed=0
for m in "${MUTATIONS[@]}"; do
  IFS='|' read -r name file old new tests <<<"$m"
  [ -n "${2:-}" ] && ! grep -qE "$2" <<<"$name" && continue
  restore
  "$PY" - "$file" "$old" "$new" <<'PYEOF' || { echo "MUTATION NOT APPLIED: $name"; missed=1; continue; }
import sys
path, old, new = (a.replace("\\n", "\n") for a in sys.argv[1:4])  # "\n" in a mutation: a line break
src = open(path).read()
if src.count(old) != 1:
    sys.exit(f"{path}: the text to mutate occurs {src.count(old)} times")
open(path, "w").write(src.replace(old, new))
PYEOF
  if ! build; then echo "BUILD FAILED: $name (see /tmp/emu_mutation_build.log)"; missed=1; continue; fi
  start=$(date +%s)
  if "$PY" -m pytest "$tests" -q -x -k cuda_emu -p no:cacheprovider >/tmp/emu_mutation_test.log 2>&1; then
    echo "NOT CAUGHT: $name ($tests passes)"
    missed=1
  else
    first=$(grep -m1 -E "^FAILED|^ERROR" /tmp/emu_mutation_test.log | cut -c1-150)
    echo "caught: $name [$(( $(date +%s) - start )) s] -> $first"
  fi
done
restore
build || { echo "rebuild of the unmutated library failed"; exit 1; }
exit $missed
