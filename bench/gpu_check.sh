#!/usr/bin/env bash
# One short GPU session (issues 3 and 5): the training path on CUDA end to end, then the throughput sweep.
#
#   bash bench/gpu_check.sh OUT_DIR
#
# Meant for a bare GPU machine with PyTorch but without mrcfile/starfile: wheels in .whl/ (if present) are installed
# into /tmp/site first. Steps:
#   1. simulate 4,000 images at box 64 -> preprocess to 32 -> train 3 epochs on CUDA (bf16 autocast, fixed poses and
#      ab initio) -> infer 500 held-out images -> check the outputs exist and are finite;
#   2. bench/throughput.py --gpu-sweep (about 4 minutes).
set -euo pipefail
out=${1:?output folder}
device=${DEVICE:-cuda}      # DEVICE=cpu N_TRAIN=300 EPOCHS=1 SKIP_SWEEP=1: a dry run on a CPU; SWEEP_BUDGET_S (120)
n_train=${N_TRAIN:-4000}
epochs=${EPOCHS:-3}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
cf() { python3 -m cryofire.cli "$@"; }
[ "$device" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee -a "$out/gpu.txt"

work=/tmp/cryofire_gpu
started=$(date +%s)
cf simulate -o $work/sim -n $((n_train + 500)) --box 64 --snr 0.1 --seed 3
cf preprocess $work/sim/particles.star -o $work/prep --box 32
python3 - "$work" <<'EOF'
import sys
from cryofire.io import read_star, write_star
work = sys.argv[1]
table = read_star(f"{work}/prep/particles.star")
write_star(f"{work}/prep/train.star", table.iloc[:-500])
write_star(f"{work}/prep/heldout.star", table.iloc[-500:])
EOF
for poses in fixed abinit; do
    cf train $work/prep/train.star -o $work/run_$poses --poses $poses --epochs $epochs --device $device --num-workers 4 \
        2>&1 | tail -n 8
    cf infer $work/run_$poses $work/prep/heldout.star -o $work/infer_$poses --device $device 2>&1 | tail -n 2
done
python3 - "$work" "$out" <<'EOF'
import json, sys
import numpy as np, torch
from cryofire.evaluate import pose_metrics
from cryofire.io import read_star
work, out = sys.argv[1:]
summary = {}
for poses in ("fixed", "abinit"):
    run = f"{work}/run_{poses}"
    epochs = [json.loads(l) for l in open(f"{run}/log.jsonl") if '"epoch"' in l and '"event": "epoch"' in l]
    weights = torch.load(f"{run}/weights.pt", weights_only=True)
    finite = all(torch.isfinite(v).all().item() for v in weights["model"].values() if v.is_floating_point())
    latents = np.load(f"{run}/latents.npy")
    heldout = np.load(f"{work}/infer_{poses}/latents.npy")
    metrics = pose_metrics(read_star(f"{run}/poses.star", allow_absolute_paths=True),
                           read_star(f"{work}/prep/train.star"))
    summary[poses] = {"epoch_seconds": [e["epoch_seconds"] for e in epochs],
                      "train_loss": [e["train_loss"] for e in epochs], "weights_finite": finite,
                      "latents": list(latents.shape), "heldout_latents": list(heldout.shape),
                      "latents_finite": bool(np.isfinite(latents).all() and np.isfinite(heldout).all()),
                      "rotation_error_median_deg": metrics["rotation_error_median_deg"]}
print(json.dumps(summary, indent=1))
json.dump(summary, open(f"{out}/cuda_training.json", "w"), indent=1)
EOF
echo "training path: $(( $(date +%s) - started )) s"
[ -n "${SKIP_SWEEP:-}" ] || python3 bench/throughput.py --gpu-sweep --time-budget-s "${SWEEP_BUDGET_S:-120}" --out "$out/throughput_gpu.json" | tee "$out/throughput_gpu.md"
