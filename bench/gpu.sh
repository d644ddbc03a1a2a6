#!/usr/bin/env bash
# The prepared GPU run, cut into steps that fit a lent machine's lease (docs/gpu-run.md): 15 minutes of
# device time in all, start-up included, and at most 10 minutes a command.
usage() {
  cat <<'EOF'
usage: bash bench/gpu.sh [--dry-run] [--within SECONDS] [--autotune FILE] STEP [OUT]
       bash bench/gpu.sh --budgets | --stage DIR | --help

STEP is one of
  first    the lease's first command (<= 4 min): versions and GPU; attention fwd/bwd vs SDPA at
           Llama-3-8B heads, decode at KV 1k/16k/128k, the memory-bound ops (python -m bench headline);
           the correctness tests on 16 workers
  rest     suites, compile, e2e in one command (the lease's second)
  suites   python -m bench attention --quick, loss --quick, ops (with torch.compile)
  compile  the torch.compile / custom-op / CUDA-graph tests
  e2e      python -m bench e2e --quick
  all      first, then rest: longer than one lent command may run; for a GPU of your own

OUT (default bench/results/gpu-<date>) receives three files, rewritten as each part ends, so that a
command stopped at its limit loses only the part it was in:
  STEP.log          everything printed, as it runs
  STEP.tar.gz       each part's JSON / junit XML, and parts.tsv (part, budget, seconds taken, exit status)
  autotune.tar.gz   Triton's autotuning results (*.autotune.json) for the shapes this run tuned

Options
  --dry-run         no GPU: stage the copy, run the headline bench on the CPU (its CPU sizes,
                    --rep-ms 1), list the cases of every other bench command (--list: parsed and
                    built, not timed) and collect each test selection (pytest --collect-only)
  --within SECONDS  the time this command has: a part gets min(its budget, what is left - 10 s),
                    and is skipped with under 20 s
  --autotune FILE   autotuning results to start from (default bench/results/autotune.tar.gz if present)
  --budgets         print each part's time budget (seconds) and which parts a step runs
  --stage DIR       only lay out the staged copy the run works from
Environment: GPU_RUN_DIR (default /tmp/llama_fast-gpu) holds the staged copy and the Triton and
Inductor caches, kept between the commands of one lease; GPU_SH_DRY_LIMIT (default 900) is each
part's limit in seconds in a dry run.
EOF
}
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# Each part's time limit in seconds, by step: the run, --budgets and tests/test_gpu_script.py read this
# table alone. The figures are estimates; no GPU has run the script in this form yet.
PLAN='
first   env        10
first   headline   85
first   tests     115
suites  attention 120
suites  loss       50
suites  ops        80
compile tests     100
e2e     e2e        75
'
# The correctness tests, new paths first (xdist hands tests out in this order): launch limits (shared
# memory, grid), sliding-window and soft-capped attention, the model families and the hub-kernel route,
# attention (TMA on sm_90), packed sequences, the fused loss kernel, then the rest.
FIRST_TESTS=(tests/test_launch_limits.py tests/test_attention_window.py tests/test_attention_softcap.py
             tests/test_families.py tests/test_hub.py tests/test_attention.py tests/test_attention_varlen.py tests/test_linear_cross_entropy.py tests/test_ops.py tests/test_zero_size.py
             tests/test_packing.py tests/test_patch.py tests/test_transformers_match.py)
COMPILE_TESTS=(tests/test_compile.py tests/test_custom_ops.py)

steps_of() {
  case "$1" in
    first|suites|compile|e2e) echo "$1" ;;
    rest) echo "suites compile e2e" ;;
    all) echo "first suites compile e2e" ;;
    *) return 1 ;;
  esac
}
parts_of() { awk -v s="$1" '$1 == s {print $2}' <<<"$PLAN"; }
budget_of() { awk -v s="$1" -v p="$2" '$1 == s && $2 == p {print $3}' <<<"$PLAN"; }

stage() {
  mkdir -p "$1"
  cp -r llama_fast "$1/llama_fast"
  # the C++ extension is not built on a lent GPU; a library built here is for another torch
  rm -rf "$1/llama_fast/kernels" "$1"/llama_fast/_C*.so "$1/llama_fast/_build_info.py"
  cp -r kernels "$1/llama_fast/kernels"
  cp -r tests bench pytest.ini "$1/"
}

DRY=0 WITHIN=0 AUTOTUNE=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --budgets)
      for s in first suites compile e2e; do for p in $(parts_of $s); do echo "part $s $p $(budget_of $s $p)"; done; done
      for s in first rest all suites compile e2e; do echo "step $s $(steps_of $s)"; done
      exit 0 ;;
    --stage) [ $# -ge 2 ] || { echo "gpu.sh: --stage needs a folder" >&2; exit 2; }; stage "$2"; exit 0 ;;
    --dry-run) DRY=1; shift ;;
    --within) [[ "${2:-}" =~ ^[0-9]+$ ]] || { echo "gpu.sh: --within needs whole seconds" >&2; exit 2; }
      WITHIN=$2; shift 2 ;;
    --autotune) [ -f "${2:-}" ] || { echo "gpu.sh: --autotune: no such file: ${2:-}" >&2; exit 2; }
      AUTOTUNE=$(realpath "$2"); shift 2 ;;
    -*) echo "gpu.sh: unknown option $1 (bash bench/gpu.sh --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { usage >&2; exit 2; }
NAME=$1
STEPS=$(steps_of "$NAME") \
  || { echo "gpu.sh: unknown step '$NAME': one of first, rest, suites, compile, e2e, all (--help)" >&2; exit 2; }
[ $# -le 2 ] || { echo "gpu.sh: one step and one OUT folder at most (--help)" >&2; exit 2; }
OUT=$(realpath -m "${2:-bench/results/gpu-$(date -u +%Y-%m-%d)}")
[ -z "$AUTOTUNE" ] && [ -f bench/results/autotune.tar.gz ] && AUTOTUNE=$ROOT/bench/results/autotune.tar.gz

RUN_DIR=$(realpath -m "${GPU_RUN_DIR:-/tmp/llama_fast-gpu}")
STAGE=$RUN_DIR/stage
WORK=$RUN_DIR/out/$NAME
LOG=$OUT/$NAME.log
rm -rf "$STAGE" "$WORK"
mkdir -p "$OUT" "$WORK" "$RUN_DIR/triton-cache" "$RUN_DIR/site"
stage "$STAGE"
: > "$LOG"
printf 'part\tbudget_s\tlimit_s\ttaken_s\texit\n' > "$WORK/parts.tsv"

export PYTHONPATH="$STAGE:$RUN_DIR/site" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
# Kept between the commands of a lease: the second compiles nothing the first did. Triton's autotuning
# results go to disk too (read once, when the kernels are decorated), and come back in autotune.tar.gz.
export TRITON_CACHE_DIR=$RUN_DIR/triton-cache TRITON_CACHE_AUTOTUNING=1
export TORCHINDUCTOR_CACHE_DIR=$RUN_DIR/inductor-cache
if [ -n "$AUTOTUNE" ]; then
  tar xzf "$AUTOTUNE" -C "$TRITON_CACHE_DIR" --wildcards '*.autotune.json' >> "$LOG" 2>&1 \
    && echo "autotuning results restored from $AUTOTUNE" >> "$LOG"
fi
if [ $DRY = 1 ]; then
  echo "DRY RUN: headline on the CPU (--rep-ms 1), the other bench commands' cases listed, tests collected only" >> "$LOG"
fi

say() { echo "$*" | tee -a "$LOG"; }

pack() {
  tar czf "$OUT/$NAME.tar.gz.tmp" -C "$RUN_DIR/out" "$NAME" && mv "$OUT/$NAME.tar.gz.tmp" "$OUT/$NAME.tar.gz"
  (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$OUT/autotune.tar.gz.tmp" -T -) \
    && mv "$OUT/autotune.tar.gz.tmp" "$OUT/autotune.tar.gz"
}

# The test files of a selection that exist; a missing one is named in the log and left out, so that a
# lent machine's minutes are not lost to pytest refusing the whole selection.
present() {
  local f
  for f in "$@"; do
    if [ -e "$f" ]; then echo "$f"; else echo "MISSING test file $f: left out" >> "$LOG"; fi
  done
}

# pytest on the GPU: 16 workers (the machine's cores), a per-test limit, never -x: one failure must not
# hide the rest. One OpenMP thread and a 4-process Inductor compile pool per worker: 16 workers each with
# Inductor's default pool of one process per core would start 256 compilers; with none, one test's cold
# compile of a model's kernels would run serially.
pytest_part() {
  local per_test=$1; shift
  local files
  files=$(present "$@")
  [ -n "$files" ] || { echo "no test file of the selection exists" >> "$LOG"; return 4; }
  if [ $DRY = 1 ]; then
    python -m pytest --collect-only -q -p no:cacheprovider $files
    return
  fi
  local opts=()
  python -c "import xdist" 2>/dev/null && opts+=(-n 16) || echo "pytest-xdist missing: one process" >> "$LOG"
  python -c "import pytest_timeout" 2>/dev/null && opts+=("--timeout=$per_test") \
    || echo "pytest-timeout missing: no per-test limit" >> "$LOG"
  LLAMA_FAST_TEST_DEVICE=cuda LLAMA_FAST_AUTOTUNE=0 OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=4 \
    python -m pytest -q -p no:cacheprovider -rfE --maxfail=30 --durations=15 "${opts[@]}" \
    --junitxml="$PART_DIR/junit.xml" $files
}

bench_cmd() {  # python -m bench ARGS, writing under the part's folder
  if [ $DRY = 1 ] && [ "$1" = headline ]; then
    python -m bench "$@" --no-progress --out "$PART_DIR" --rep-ms 1
  elif [ $DRY = 1 ]; then
    python -m bench "$@" --list
  else
    python -m bench "$@" --no-progress --out "$PART_DIR"
  fi
}

part_cmd() {
  case "$1/$2" in
    first/env)
      { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader \
          || echo "nvidia-smi: none here"
        python -c "import torch, triton, transformers as t; print('torch', torch.__version__, 'triton', triton.__version__,
          'transformers', t.__version__, 'GPU', torch.cuda.is_available() and torch.cuda.get_device_name())"
        python -m pip list 2>/dev/null | grep -iE '^(pytest|pytest-xdist|pytest-timeout|liger)' || true
        echo "autotuning results on disk: $(find "$TRITON_CACHE_DIR" -name '*.autotune.json' | wc -l)"
        date -u; } | tee "$PART_DIR/env.txt"
      # A Liger-Kernel wheel in .wheels/ (carried with the run) joins the providers.
      if [ $DRY = 0 ] && ls "$ROOT"/.wheels/liger_kernel-*.whl >/dev/null 2>&1; then
        python -m pip install -q --no-deps --no-index --target "$RUN_DIR/site" "$ROOT"/.wheels/liger_kernel-*.whl
      fi ;;
    first/headline) bench_cmd headline ;;
    first/tests) pytest_part 60 "${FIRST_TESTS[@]}" ;;
    suites/attention) bench_cmd attention --quick ;;
    suites/loss) bench_cmd loss --quick ;;
    suites/ops) bench_cmd ops --model llama3-8b --model smollm2-135m --tokens 8192 ;;
    compile/tests) pytest_part 120 "${COMPILE_TESTS[@]}" ;;
    e2e/e2e) bench_cmd e2e --quick --no-smollm2 ;;
    *) echo "gpu.sh: no command for part $1/$2" >&2; return 2 ;;
  esac
}

status=0
cd "$STAGE"
for step in $STEPS; do
  for part in $(parts_of "$step"); do
    budget=$(budget_of "$step" "$part")
    limit=$budget
    # A dry run's CPU sizes on a shared CI machine are not the budget's: there only a hang is stopped.
    [ $DRY = 1 ] && limit=${GPU_SH_DRY_LIMIT:-900}
    if [ "$WITHIN" -gt 0 ] && [ $((WITHIN - SECONDS - 10)) -lt $limit ]; then
      limit=$((WITHIN - SECONDS - 10))
    fi
    if [ "$WITHIN" -gt 0 ] && [ $limit -lt 20 ]; then
      say "== $step/$part: skipped, ${limit}s left of --within $WITHIN"
      printf '%s\t%s\t%s\t0\tskipped\n' "$step/$part" "$budget" "$limit" >> "$WORK/parts.tsv"
      status=1
      continue
    fi
    PART_DIR=$WORK/$step-$part
    mkdir -p "$PART_DIR"
    say "== $step/$part (limit ${limit}s of a ${budget}s budget) $(date -u +%H:%M:%S)"
    start=$SECONDS
    offset=$(stat -c %s "$LOG")
    rm -f "$RUN_DIR/timed_out"
    # Job control on while they start: the part and its watchdog each run in a process group of their own,
    # which the watchdog ends whole at the part's limit (pytest's workers, Inductor's compile processes
    # too), while the script goes on to pack and to the next part. timeout(1) cannot run a shell function.
    set -m
    ( part_cmd "$step" "$part" ) >> "$LOG" 2>&1 &
    pid=$!
    ( sleep "$limit"; touch "$RUN_DIR/timed_out"; kill -TERM -- -$pid 2>/dev/null; sleep 10
      kill -KILL -- -$pid 2>/dev/null ) >/dev/null 2>&1 &
    watchdog=$!
    set +m
    wait $pid
    rc=$?
    kill -- -$watchdog 2>/dev/null
    wait $watchdog 2>/dev/null
    taken=$((SECONDS - start))
    if [ -e "$RUN_DIR/timed_out" ]; then
      rc="timeout"
      kill -KILL -- -$pid 2>/dev/null  # what outlived the shell that led the group (results are on disk already)
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$step/$part" "$budget" "$limit" "$taken" "$rc" >> "$WORK/parts.tsv"
    tail -c +$((offset + 1)) "$LOG" | tail -n 12
    say "== $step/$part: exit $rc after ${taken}s"
    [ "$rc" = 0 ] || status=1
    pack
  done
done
pack
cd "$ROOT"
say ""
{ column -t -s $'\t' "$WORK/parts.tsv" 2>/dev/null || cat "$WORK/parts.tsv"; } | tee -a "$LOG"
say "files: $(ls "$OUT" | tr '\n' ' ')"
exit $status
