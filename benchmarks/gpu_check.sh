#!/usr/bin/env bash
# The GPU check (issue 19): one command that, on a GPU machine, exports the tiny test models and
# ViT-B-16 at 224 and 448 in fp32 and fp16, runs the gpu-marked tests, then the GPU benchmark table,
# and writes JSON, a log and a summary to OUTDIR. benchmarks/README.md (section "GPU: bench.py
# --device cuda and gpu_check.sh") says how to run it on the H200 machine, which has no network and
# gets onnxruntime-gpu in two runs.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--budget SECONDS] OUTDIR
#
# Stages, in order, each under a timeout and all within one time budget (default 450 s):
#   unpack   source .gpu-carry/1/unpack.sh when present (it fails, with its line, if a part is missing;
#            then the python's own onnxruntime stays)
#   install  carried wheels (.whl/*.whl) with pip --target, no network; this project by symlinks when
#            its packages are not importable from this tree
#   env      OUTDIR/env.json: GPU, driver, CUDA, torch, onnxruntime (does a CUDA session start?),
#            modules. Without CUDA: "no CUDA: skipping the GPU stages", summary, exit 0
#   export   in parallel: the tiny test models (tests/tiny_models.py) and ViT-B-16 (random weights)
#            at each size, fp32 and, when legrad-export has --dtype, fp16, and fp16 with --prompts batch
#            (no Scan; its LeGrad rows are timed beside the default's); kept in WORK for later runs
#   test     pytest -m gpu (needs onnxruntime's CUDA provider)
#   onnx     bench.py --device cuda, the ONNX rows (plain forward and LeGrad, fp32 and fp16, the
#            runtime), with the torch rows of an earlier run added: OUTDIR/bench-SIZE.json (P=1),
#            bench-SIZE-p4.json (P=4); needs onnxruntime's CUDA provider
#   torch    bench.py --device cuda, the torch rows (reference, torch.compile, authors' approach), for
#            sizes no earlier run measured: WORK/torch-SIZE.json (kept for the next run), merged into
#            OUTDIR/bench-SIZE.json. Without onnxruntime's CUDA provider it runs alone (the first of two
#            runs) and copies its JSON to OUTDIR; the next run, which has it, adds these rows
#   report   OUTDIR/summary.md, with the issue's targets
# A stage whose JSON or export is already in WORK is not run again. Each stage's result line goes to
# the log and the summary; the script exits 0 unless OUTDIR cannot be written or an argument is wrong,
# so that what was measured always comes back.
#
# Settings (environment): PYTHON (python3), GPU_CHECK_WORK (models/gpu-check), GPU_CHECK_BUDGET_S (450),
# GPU_CARRY (.gpu-carry), GPU_CHECK_WHEELS (.whl), GPU_CHECK_SITE (/tmp/legrad-gpu-site), GPU_CHECK_SIZES ("224 448"),
# GPU_CHECK_BATCH_224 (256), GPU_CHECK_BATCH_448 (64), GPU_CHECK_BATCH (32, other sizes),
# GPU_CHECK_REPEATS (5), GPU_CHECK_COMPILE_SIZES ("224"), GPU_CHECK_COMPILE_DTYPE (fp16),
# GPU_CHECK_AUTHORS_IMAGES (32), GPU_CHECK_STAGES (all: "export test torch onnx"); GPU_CHECK_PRETEND_CUDA=1
# is for this script's own test (the GPU path, walked on a CPU machine).

set -u -o pipefail

usage() { echo "usage: bash benchmarks/gpu_check.sh [--dry-run] [--budget SECONDS] OUTDIR" >&2; exit 2; }
DRY=0
OUTDIR=""
BUDGET=${GPU_CHECK_BUDGET_S:-450}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) [ $# -ge 2 ] || usage; BUDGET=$2; shift ;;
    -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check: unknown option $1" >&2; usage ;;
    *) [ -z "$OUTDIR" ] || usage; OUTDIR=$1 ;;
  esac
  shift
done
[ -n "$OUTDIR" ] || usage
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check: --budget takes whole seconds, not '$BUDGET'" >&2; exit 2 ;; esac

mkdir -p "$OUTDIR" || { echo "gpu_check: cannot create $OUTDIR" >&2; exit 1; }
OUTDIR=$(cd "$OUTDIR" && pwd)   # the caller's path; everything else is relative to the project root
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
PYTHON=${PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-models/gpu-check}
mkdir -p "$WORK/logs" || { echo "gpu_check: cannot create $WORK" >&2; exit 1; }
WORK=$(cd "$WORK" && pwd)
WHEELS=${GPU_CHECK_WHEELS:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/legrad-gpu-site}
SIZES=${GPU_CHECK_SIZES:-224 448}
REPEATS=${GPU_CHECK_REPEATS:-5}
COMPILE_SIZES=${GPU_CHECK_COMPILE_SIZES:-224}
COMPILE_DTYPE=${GPU_CHECK_COMPILE_DTYPE:-fp16}
AUTHORS_IMAGES=${GPU_CHECK_AUTHORS_IMAGES:-32}
STAGES=${GPU_CHECK_STAGES:-export test torch onnx}
RESERVE=20      # seconds kept for the report at the end
MIN_STAGE=15    # a stage that would get less than this is skipped
STATUS="$WORK/stages.txt"
: > "$STATUS"

LOG="$OUTDIR/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
finish() { exec 1>&- 2>&-; wait "$TEE_PID" 2>/dev/null; }
trap finish EXIT

T0=$SECONDS
say() { printf '[gpu_check +%ss] %s\n' "$((SECONDS - T0))" "$*"; }
note() { say "$*"; printf '%s\n' "$*" >> "$STATUS"; }
wants() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
quoted() { printf '%q ' "$@"; }

# the seconds a stage may take: its cap, or what the budget has left (less the report's reserve)
stage_limit() {
  local cap=$1 left=$((BUDGET - (SECONDS - T0) - RESERVE))
  [ "$left" -lt "$cap" ] && cap=$left
  echo "$cap"
}

# run_timed NAME CAP CMD...: CMD under a timeout; one result line; returns CMD's exit status
run_timed() {
  local name=$1 cap=$2 limit start rc took
  shift 2
  limit=$(stage_limit "$cap")
  if [ "$limit" -lt "$MIN_STAGE" ]; then
    note "$name: skipped, out of the ${BUDGET}s budget"
    return 124
  fi
  if [ "$DRY" = 1 ]; then
    say "dry run: would run (timeout ${limit}s): $(quoted "$@")"
    note "$name: dry run"
    return 0
  fi
  say "$name (timeout ${limit}s): $(quoted "$@")"
  start=$SECONDS
  timeout --kill-after=15 "$limit" "$@"
  rc=$?
  took=$((SECONDS - start))
  case $rc in
    0) note "$name: ok (${took}s)" ;;
    124|137) note "$name: TIMED OUT after ${limit}s" ;;
    *) note "$name: FAILED, exit $rc (${took}s)" ;;
  esac
  return "$rc"
}

batch_for() {
  case "$1" in
    224) echo "${GPU_CHECK_BATCH_224:-256}" ;;
    448) echo "${GPU_CHECK_BATCH_448:-64}" ;;
    *) echo "${GPU_CHECK_BATCH:-32}" ;;
  esac
}

report() {
  "$PYTHON" benchmarks/gpu_check.py report "$OUTDIR" --stages "$STATUS" --md "$OUTDIR/summary.md" \
    || say "report: FAILED (the JSON files are in $OUTDIR)"
  say "wrote $OUTDIR/summary.md; done in $((SECONDS - T0))s"
}

say "root $ROOT, out $OUTDIR, work $WORK, python $PYTHON, budget ${BUDGET}s$([ "$DRY" = 1 ] && echo ', dry run')"

# --- unpack: onnxruntime-gpu carried in parts (../shared/gpu/README.md) ------------------------------
CARRY=${GPU_CARRY:-.gpu-carry}   # unpack.sh reads the same variable
if [ -f "$CARRY/1/unpack.sh" ]; then
  if [ "$DRY" = 1 ]; then
    say "dry run: would source $CARRY/1/unpack.sh"
  else
    saved_pythonpath=${PYTHONPATH-}
    # shellcheck disable=SC1090,SC1091
    if source "$CARRY/1/unpack.sh"; then
      note "unpack: onnxruntime-gpu unpacked to /tmp/ort-gpu-site"
    else  # a part missing, or a package this python cannot import: keep the python's own onnxruntime
      export PYTHONPATH=$saved_pythonpath
      [ -n "$PYTHONPATH" ] || unset PYTHONPATH
      note "unpack: onnxruntime-gpu NOT unpacked (line above); the test and onnx stages need it"
    fi
  fi
else
  say "unpack: no $CARRY/1/unpack.sh, using $PYTHON's own onnxruntime"
fi

# --- install: carried wheels, then this tree's packages ----------------------------------------------
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
shopt -u nullglob
if [ ${#wheels[@]} -gt 0 ]; then
  if [ "$DRY" = 1 ]; then
    say "dry run: would install ${#wheels[@]} wheels from $WHEELS into $SITE/wheels"
  elif "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE/wheels" "${wheels[@]}"; then
    export PYTHONPATH="$SITE/wheels${PYTHONPATH:+:$PYTHONPATH}"
    note "install: ${#wheels[@]} wheels from $WHEELS ($(cd "$WHEELS" && ls ./*.whl | sed 's|^\./||; s/-py3.*//; s/-cp3.*//' | tr '\n' ' '))"
  else
    note "install: the wheels in $WHEELS FAILED to install (above)"
  fi
else
  say "install: no wheels in $WHEELS"
fi
# this tree's packages: installed (pip install -e .) from this very tree, or linked from it
if ! "$PYTHON" - "$ROOT" <<'EOF' 2>/dev/null
import importlib.util, pathlib, sys
root = pathlib.Path(sys.argv[1]).resolve()
for name, folder in (("legrad_runtime", "runtime"), ("legrad_export", "export")):
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or pathlib.Path(spec.origin).resolve().parent != root / folder:
        sys.exit(1)
EOF
then
  mkdir -p "$SITE/project"
  ln -sfn "$ROOT/runtime" "$SITE/project/legrad_runtime"
  ln -sfn "$ROOT/export" "$SITE/project/legrad_export"
  ln -sfn "$ROOT/tools/shapes/legrad_shapes" "$SITE/project/legrad_shapes"
  export PYTHONPATH="$SITE/project${PYTHONPATH:+:$PYTHONPATH}"
  note "install: this tree's packages linked from $SITE/project (no pip install needed)"
fi

# --- env ---------------------------------------------------------------------------------------------
HAS_CUDA=0 HAS_ORT_CUDA=0 DEPS_OK=0
if "$PYTHON" benchmarks/gpu_check.py env --json "$OUTDIR/env.json" --flags "$WORK/env.sh"; then
  # shellcheck disable=SC1091
  source "$WORK/env.sh"
else
  note "env: FAILED (above); $OUTDIR/env.json may be missing"
fi
if [ "${GPU_CHECK_PRETEND_CUDA:-0}" = 1 ]; then  # tests only: walk the GPU path on a CPU machine
  HAS_CUDA=1
  say "GPU_CHECK_PRETEND_CUDA=1: pretending torch sees CUDA (a test of this script)"
fi
[ "$DEPS_OK" = 1 ] || note "env: modules are missing (MISSING above): carry their wheels in $WHEELS (benchmarks/README.md)"

if [ "$HAS_CUDA" != 1 ]; then
  if [ "$DRY" = 1 ]; then
    say "no CUDA here (dry run: the GPU stages' commands follow; none is run)"
    HAS_ORT_CUDA=1
  else
    note "no CUDA: skipping the GPU stages"
    report
    exit 0
  fi
fi
if [ "$HAS_ORT_CUDA" != 1 ] && [ "$DRY" != 1 ]; then
  note "onnxruntime has no working CUDA provider: the test and onnx stages will be skipped"
fi

# --- export (parallel) -------------------------------------------------------------------------------
FP16=0
export_help=$("$PYTHON" -m legrad_export.cli --help 2>/dev/null)
if grep -q -- '--dtype' <<< "$export_help"; then
  FP16=1
else
  note "export: legrad-export has no --dtype: no fp16 exports, the fp16 rows are skipped"
fi
DTYPES="fp32$([ "$FP16" = 1 ] && echo ' fp16')"
# the same fp16 graph with its prompts batched (no Scan; legrad-export --prompts batch): its LeGrad rows
# are timed beside the default's (bench.py --extra-legrad), to choose the GPU default by measurement
BATCHED=""
if [ "$FP16" = 1 ] && grep -q -- '--prompts' <<< "$export_help"; then
  BATCHED=fp16-batch
else
  note "export: legrad-export has no --prompts (or no --dtype): no batched-prompts rows"
fi
# a finished export's marker, WORK/KIND/ViT-B-16-SIZE.done, holds the folder legrad-export printed
# (ViT-B-16__none__SIZE, with __fp16 for fp16); it lies beside the folder, which holds its own files only
marker_of() { echo "$WORK/$2/ViT-B-16-$1.done"; }   # SIZE KIND (fp32, fp16, fp16-batch)
exported() { [ -s "$(marker_of "$1" "$2")" ] && [ -d "$(cat "$(marker_of "$1" "$2")")" ]; }  # SIZE KIND
folder_of() {                                         # SIZE KIND
  if exported "$1" "$2"; then cat "$(marker_of "$1" "$2")"
  else echo "$WORK/$2/ViT-B-16__none__$1$(case $2 in fp16*) echo __fp16 ;; esac)"; fi
}

if wants export; then
  jobs_names=()
  declare -A job_pid=()
  n_jobs=1
  for size in $SIZES; do for dtype in $DTYPES $BATCHED; do n_jobs=$((n_jobs + 1)); done; done
  nproc_=$(nproc 2>/dev/null || echo 4)
  threads=$(( nproc_ / n_jobs )); [ "$threads" -ge 1 ] || threads=1
  limit=$(stage_limit 300)
  if [ "$limit" -lt "$MIN_STAGE" ]; then
    note "export: skipped, out of the ${BUDGET}s budget"
  else
    start_job() {  # NAME MARKER CMD...
      local name=$1 marker=$2
      shift 2
      if [ -s "$marker" ]; then
        say "export $name: already in $WORK ($(cat "$marker")), kept"
        return
      fi
      if [ "$DRY" = 1 ]; then
        say "dry run: would run (timeout ${limit}s, in the background): $(quoted "$@")"
        return
      fi
      ( timeout --kill-after=15 "$limit" "$@" > "$WORK/logs/export-$name.out" 2> "$WORK/logs/export-$name.log"
        echo "$? $SECONDS" > "$WORK/logs/export-$name.rc" ) &   # status, and when it ended
      job_pid[$name]=$!
      jobs_names+=("$name")
      echo "$marker" > "$WORK/logs/export-$name.marker"
    }
    say "export: up to $n_jobs jobs in parallel, $threads threads each, timeout ${limit}s"
    start_job tiny "$WORK/tiny.done" env OMP_NUM_THREADS="$threads" "$PYTHON" tests/tiny_models.py "$WORK/tiny"
    for size in $SIZES; do
      for dtype in $DTYPES $BATCHED; do
        extra=()
        [ "$dtype" = fp16 ] && extra=(--dtype fp16)
        [ "$dtype" = fp16-batch ] && extra=(--dtype fp16 --prompts batch)
        start_job "vit-b-16-$size-$dtype" "$(marker_of "$size" "$dtype")" \
          env OMP_NUM_THREADS="$threads" "$PYTHON" -m legrad_export.cli --model ViT-B-16 --pretrained none \
          --image-size "$size" --out "$WORK/$dtype" --overwrite --no-verify "${extra[@]}"
      done
    done
    start=$SECONDS
    for name in "${jobs_names[@]}"; do
      wait "${job_pid[$name]}"
      read -r rc ended 2>/dev/null < "$WORK/logs/export-$name.rc" || { rc='?'; ended=$SECONDS; }
      case $rc in
        0)  # the last line an export prints is its folder (tiny_models.py: one line per folder)
          awk 'NF {last = $NF} END {print last}' "$WORK/logs/export-$name.out" > "$(cat "$WORK/logs/export-$name.marker")"
          note "export $name: ok ($((ended - start))s)" ;;
        124|137) note "export $name: TIMED OUT after ${limit}s"; tail -n 5 "$WORK/logs/export-$name.log" ;;
        *) note "export $name: FAILED, exit $rc"; tail -n 5 "$WORK/logs/export-$name.out"
           tail -n 15 "$WORK/logs/export-$name.log" ;;
      esac
    done
  fi
fi

# --- test: pytest -m gpu -----------------------------------------------------------------------------
if wants test; then
  if [ "$HAS_ORT_CUDA" != 1 ]; then
    note "test: skipped, no onnxruntime CUDA provider (send .gpu-carry/2 in a run right after this one)"
  else
    mapfile -t gpu_files < <(grep -rl 'mark\.gpu' tests --include='test_*.py' 2>/dev/null | sort)
    [ ${#gpu_files[@]} -gt 0 ] || gpu_files=(tests)
    test_env=(env LEGRAD_GPU_CHECK_WORK="$WORK")
    [ -s "$WORK/tiny.done" ] || [ "$DRY" = 1 ] && test_env+=(LEGRAD_TEST_MODEL_DIR="$WORK/tiny")
    run_timed "test (pytest -m gpu)" 240 "${test_env[@]}" "$PYTHON" -m pytest -m gpu -q -rfEs \
      -p no:cacheprovider --continue-on-collection-errors "${gpu_files[@]}"
    case $? in
      5) note "test: no test is marked gpu (pytest exit 5: nothing selected)" ;;
    esac
  fi
fi

bench=("$PYTHON" benchmarks/bench.py --device cuda --repeats "$REPEATS" --warmups 2 --sweep-prompts '' --sweep-layers 0)
in_list() { case " $2 " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# --- torch: the torch rows, kept in WORK for a later run. $1: "copy" (into OUTDIR: no onnxruntime-gpu
# here), or "merge" (into OUTDIR/bench-SIZE.json, which the onnx stage wrote before without them)
torch_stage() {
  local size json methods
  for size in $SIZES; do
    json="$WORK/torch-$size.json"
    if [ -s "$json" ] && [ "$DRY" != 1 ]; then
      say "torch $size: $json already measured, kept"
      [ "$1" = copy ] && cp "$json" "$OUTDIR/"
      continue
    fi
    if ! exported "$size" fp32 && [ "$DRY" != 1 ]; then
      note "torch $size: skipped, no export $(folder_of "$size" fp32)"
      continue
    fi
    methods=reference,authors   # torch.compile last: its compiles are the slowest rows, and may not fit
    in_list "$size" "$COMPILE_SIZES" && methods=reference,authors,compile
    run_timed "torch $size" 240 "${bench[@]}" --model-folder "$(folder_of "$size" fp32)" \
      --batch "$(batch_for "$size")" --prompts 1 --methods "$methods" --compile-dtype "$COMPILE_DTYPE" \
      --authors-images "$AUTHORS_IMAGES" --latency-runs 10 --json "$json"
    if [ -s "$json" ] && [ "$1" = copy ]; then
      cp "$json" "$OUTDIR/"
    elif [ -s "$json" ] && [ -s "$OUTDIR/bench-$size.json" ]; then
      "$PYTHON" benchmarks/gpu_check.py merge "$OUTDIR/bench-$size.json" "$json" \
        || cp "$json" "$OUTDIR/"
    elif [ -s "$json" ]; then
      cp "$json" "$OUTDIR/"
    fi
  done
}

# --- onnx: the ONNX rows, with the torch rows added where a run before measured them ----------------
onnx_stage() {
  local prompts size f32 f16 args
  for prompts in 1 4; do
    for size in $SIZES; do
      f32=$(folder_of "$size" fp32) f16=$(folder_of "$size" fp16)
      if ! exported "$size" fp32 && [ "$DRY" != 1 ]; then
        note "onnx $size P=$prompts: skipped, no export $f32"
        continue
      fi
      args=(--model-folder "$f32" --batch "$(batch_for "$size")" --prompts "$prompts")
      if [ "$FP16" = 1 ] && { exported "$size" fp16 || [ "$DRY" = 1 ]; }; then
        args+=(--dtype fp32,fp16 --fp16-folder "$f16")
      fi
      if [ -n "$BATCHED" ] && { exported "$size" "$BATCHED" || [ "$DRY" = 1 ]; }; then
        args+=(--extra-legrad "batch=$(folder_of "$size" "$BATCHED")")
      fi
      if [ "$prompts" = 1 ]; then
        args+=(--methods plain,legrad,runtime --latency-runs 20 --json "$OUTDIR/bench-$size.json")
        { [ -s "$WORK/torch-$size.json" ] || [ "$DRY" = 1 ]; } && args+=(--add-rows "$WORK/torch-$size.json")
      else
        args+=(--methods plain,legrad --latency-runs 10 --json "$OUTDIR/bench-$size-p$prompts.json")
      fi
      run_timed "onnx $size P=$prompts" 180 "${bench[@]}" "${args[@]}"
    done
  done
}

# With onnxruntime-gpu the ONNX rows (the issue's targets) come first, then any torch rows no earlier
# run measured, merged into their tables. Without it (the first of two runs) only the torch rows.
if [ "$HAS_ORT_CUDA" = 1 ]; then
  wants onnx && onnx_stage
  wants torch && torch_stage merge
else
  wants torch && torch_stage copy
  wants onnx && note "onnx: skipped, no onnxruntime CUDA provider (send .gpu-carry/2 in a run right after this one)"
fi

report
exit 0
