#!/usr/bin/env bash
# step NAME CMD...: says NAME as it starts and how long it took; CMD's own output (pip's progress and
# warnings) goes to $PAGEDLLM_STEP_LOG, and its last lines are shown only when it fails. Sourced by
# setup.sh and main.sh. The messages go to stderr, so `setup.sh >/dev/null` still shows them.
: "${PAGEDLLM_STEP_LOG:=${TMPDIR:-/tmp}/pagedllm-setup-$$.log}"
export PAGEDLLM_STEP_LOG

step() {
  local name=$1 start=$SECONDS rc=0
  shift
  printf '==> %s ...\n' "$name" >&2
  { printf '\n==> %s: %s\n' "$name" "$*"; } >>"$PAGEDLLM_STEP_LOG"
  "$@" >>"$PAGEDLLM_STEP_LOG" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    printf '==> %s FAILED after %ds (exit %d); the end of %s:\n' "$name" $((SECONDS - start)) "$rc" \
      "$PAGEDLLM_STEP_LOG" >&2
    tail -n 30 "$PAGEDLLM_STEP_LOG" >&2
    return "$rc"
  fi
  printf '    %s: done in %ds\n' "$name" $((SECONDS - start)) >&2
}
