#!/usr/bin/env bash
# The GPU measurements of the ImageNet issue in one run of under 10 minutes on one H100 or H200 with 16 CPU cores.
# Each part has its own time limit and the script goes on after a part that fails or runs out of time, so one
# run brings back what it can. Results files go to $OUT (default benchmarks/results), the log to stdout.
#
#   1. ResNet-50 bf16 train step at batch 256 and 512: JAX against torch.compile, interleaved, and each JAX row's
#      MFU (achieved FLOP/s over the chip's dense bf16 peak, at 24.5 GFLOP per trained 224x224 image).
#   2. The ImageNet JPEG pipelines on 1, 8 and 16 cores against torchvision (`bench --input imagenet`), on the
#      synthetic JPEG set written here on the machine's CPUs.
#   3. End to end: `bench --config configs/imagenet_resnet50.py` on that set: its step at the config's batch and
#      its input pipeline on the host, and whether the input keeps up.
# Parts 2 and 3 need TensorFlow and tensorflow-datasets; where they are missing the script says so and skips them.
#
#   benchmarks/gpu/imagenet_resnet50.sh            # on the GPU machine, from the repository root
#   DRY=1 benchmarks/gpu/imagenet_resnet50.sh      # the same commands at toy sizes on a CPU: checks the script
#
# PYTHON (default python3) runs the project: `$PYTHON -m resnet_jax.cli` must import it (an install or PYTHONPATH).
set -uo pipefail

PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
DATA=${DATA:-/tmp/resnet-jax-imagenet-synthetic}
DRY=${DRY:-0}
RJ=("$PYTHON" -m resnet_jax.cli)
export PYTHONUNBUFFERED=1
failed=()

if [[ $DRY == 1 ]]; then  # toy sizes, CPU rows: every command and option of the real run, in a minute or two
    STEP=(--model resnet18 --image-size 64 --batch 8 16 --precision bf16 --torch-variants eager --steps 2 --warmup 1
        --repeats 1 --batch-parts 0)
    INPUT=(--batch 8 --steps 2 --warmup 1 --repeats 1 --cores 1)
    E2E=(--config.model=resnet18 --config.batch_size=8 --steps 2 --warmup 1 --repeats 1)
    LIMITS=(600 600 600)
else
    STEP=(--model resnet50 --precision bf16 --batch 256 512 --torch-variants compile --steps 20 --repeats 2)
    INPUT=(--batch 128 --steps 10 --repeats 2 --cores 1 8 16)
    E2E=(--steps 20 --repeats 2)
    LIMITS=(300 150 170)
fi

part() {  # part NAME LIMIT COMMAND...: run COMMAND under LIMIT seconds; note a failure and go on
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local began=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local status=$?
    echo "=== $name: exit $status after $((SECONDS - began))s"
    ((status == 0)) || failed+=("$name (exit $status)")
}

mfu() {  # the MFU of each JAX train row of the newest results file in $OUT
    "$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path

FLOP_PER_IMAGE = 24.5e9  # ResNet-50 at 224x224: 4.1 GMACs forward, x2 FLOP per MAC, x3 for forward + backward
PEAK = {"h100": 989e12, "h200": 989e12}  # dense bf16 FLOP/s of the SXM parts
path = max(Path(sys.argv[1]).glob("*.json"), key=lambda p: p.stat().st_mtime)
record = json.loads(path.read_text())
kind = record["device"]["kind"].lower()
peak = next((value for name, value in PEAK.items() if name in kind), None)
for row in record["train"]:
    if row["framework"] != "jax":
        continue
    rate, label = row["img_per_s"], f"{row['model']} {row['image_size']}px batch {row['batch']} {row['variant']}"
    if row["model"] != "resnet50" or row["image_size"] != 224:
        share = "no MFU (the FLOP count is ResNet-50's at 224x224)"
    else:
        share = f"MFU {rate * FLOP_PER_IMAGE / peak:.1%}" if peak else f"no MFU (unknown peak for {kind})"
    print(f"{label}: {rate:,.0f} img/s, {share} ({path.name})")
PY
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
nproc
"$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())" || failed+=("jax import")

part "train step vs torch.compile" "${LIMITS[0]}" "${RJ[@]}" bench "${STEP[@]}" --vs-torch --no-input --out "$OUT"
mfu || failed+=("mfu")

if "$PYTHON" -c "import tensorflow, tensorflow_datasets" 2>/dev/null; then
    if [[ $DRY == 1 ]]; then  # a toy set: 8 classes, a third of ImageNet's sides
        "$PYTHON" -c "from resnet_jax.data.synthetic_jpegs import prepare_synthetic_jpegs as p
p('$DATA', {'train': 64, 'validation': 16}, num_classes=8, scale=0.3)" || failed+=("toy data set")
    fi
    # Writes the set ($DATA) first when it is missing: 3,000 + 1,000 JPEGs, about a minute on 2 cores.
    part "JPEG input pipelines vs torchvision" "${LIMITS[1]}" "${RJ[@]}" bench --input imagenet --data-dir "$DATA" \
        "${INPUT[@]}" --out "$OUT"
    part "end to end, configs/imagenet_resnet50.py" "${LIMITS[2]}" "${RJ[@]}" bench \
        --config configs/imagenet_resnet50.py --config.dataset=imagenet_synthetic --config.data_dir="$DATA" \
        "${E2E[@]}" --out "$OUT"
    mfu || failed+=("mfu")
else
    echo "skipped the JPEG input rows and the end-to-end row: TensorFlow and tensorflow-datasets are not importable"
    failed+=("no tensorflow")
fi

if ((${#failed[@]})); then
    echo "not done: ${failed[*]}"
    exit 1
fi
echo "all parts done"
