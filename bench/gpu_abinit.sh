#!/usr/bin/env bash
# One GPU call for issue 3: the ab initio benchmarks on CUDA, jobs side by side on one GPU, each under a deadline
# (a job cut off by it still leaves its log).
#
#   bash bench/gpu_abinit.sh OUT_DIR
#
#   B. bench/accuracy.py at D=64 with N64 + 2,000 images (seed 1, the "em" teacher, EPOCHS64 epochs), started first:
#      the D=64 target measured end to end. Log OUT/acc64.log, search and epoch records OUT/acc64_log.jsonl,
#      results OUT/acc64.json.
#   A. bench/accuracy.py at D=32 (10,000 + 2,000 images, seeds in SEEDS32; EPOCHS epochs) with SIMULATED images
#      from the teacher's class maps added to every step (`simulated_batch_size`), their noise rising from 0.1 of the
#      data's over NOISE_RAMP of the run (default 0.3), and an encoder of ENCODER_CHANNELS doubling to
#      ENCODER_MAX_CHANNELS (default 8 -> 64, the narrow encoder: thirteenth session), in-plane canonical unless
#      CANONICAL=false (fourteenth session), re-centring each image by its first pass's shift unless RECENTRE=false,
#      the results from a moving average of the weights with decay EMA_DECAY (default 0.995; the D=64 job too;
#      both fifteenth session): OUT/acc32s<seed>.*.
#   C. bench/encoder_synthetic.py on CUDA for MINUTES (unlimited images from the true-pose maps of the seed-1 set,
#      batch 512, the same encoder, ENCODER_FLAGS, default a cosine-decaying learning rate and the noise rising from
#      0.1 of the data's over the first 300,000 images): OUT/encoder.log.
# Eighth session (the first run of this script, with EPOCHS=10, no simulated images, N64=50000, EPOCHS64=2, all four
# jobs at once): bench/RESULTS.md.
#
# A bare GPU machine has PyTorch but not mrcfile/starfile: wheels in .whl/ are installed into /tmp/site first.
# Dry run on a CPU (a few minutes):
#   DEVICE=cpu N32=600 N64=300 EPOCHS=1 EPOCHS64=1 SIMULATED=8 MINUTES=0.5 REPORT_EVERY=2 EM_ITERATIONS=20 \
#       EM_STARTS=1 DEADLINE_S=1200 bash bench/gpu_abinit.sh OUT
set -uo pipefail
out=${1:?output folder}
device=${DEVICE:-cuda}
n32=${N32:-10000}
n64=${N64:-50000}
seeds32=${SEEDS32:-1}
epochs=${EPOCHS:-12}
epochs64=${EPOCHS64:-2}
simulated=${SIMULATED:-512}
minutes=${MINUTES:-7}
report_every=${REPORT_EVERY:-100}
encoder_flags=${ENCODER_FLAGS:---cosine --clean-start 0.1 300000}
channels=${ENCODER_CHANNELS:-8}
max_channels=${ENCODER_MAX_CHANNELS:-64}
canonical=${CANONICAL:-true}
recentre=${RECENTRE:-true}
noise_ramp=${NOISE_RAMP:-0.3}
ema_decay=${EMA_DECAY:-0.995}
encoder_json="{\"channels\": $channels, \"max_channels\": $max_channels, \"inplane_canonical\": $canonical,"
encoder_json+=" \"recentre\": $recentre}"
model32="{\"encoder_channels\": $channels, \"encoder_max_channels\": $max_channels,"
model32+=" \"encoder_inplane_canonical\": $canonical, \"encoder_recentre\": $recentre}"  # ModelConfig
em_iterations=${EM_ITERATIONS:-700}  # the EM teacher's defaults (TrainConfig, EMConfig)
em_starts=${EM_STARTS:-4}
deadline=${DEADLINE_S:-550}          # seconds from the start until every job is stopped
mkdir -p "$out"
started=$(date +%s)
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD:$PWD/bench
else
    export PYTHONPATH=$PWD:$PWD/bench
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3
[ "$device" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'threads', torch.get_num_threads())" | tee -a "$out/gpu.txt"
left() { echo $(( deadline - ($(date +%s) - started) )); }
work=/tmp/cryofire_abinit
options() {  # simulated_batch_size
    printf '{"learning_rate": 1e-3, "search_fraction": 1.0, "teacher": "em", "device": "%s", "num_workers": 3, "em_iterations": %d, "em_starts": %d, "simulated_batch_size": %d, "simulated_noise_ramp": %s, "ema_decay": %s}' \
        "$device" "$em_iterations" "$em_starts" "$1" "$noise_ramp" "$ema_decay"
}
# Data as accuracy.py prepares it (simulated at twice the box on the CPU, then Fourier-cropped).
prepare() {  # box n_train seed folder
    python3 -c "import time; from pathlib import Path; from accuracy import prepare; t = time.time(); \
prepare(Path('$4'), $1, $2, 2000, $3); print('D=$1 seed $3: $2 + 2000 images prepared in %.0f s' % (time.time() - t))" \
        2>&1 | grep prepared | tee -a "$out/prepare.log"
}
accuracy() {  # name folder box n_train epochs seed simulated_batch_size model_json
    timeout "$(left)" python3 bench/accuracy.py --out "$2" --box "$3" --n-train "$4" --epochs "$5" --seed "$6" \
        --train "$(options "$7")" --model "$8" > "$out/$1.log" 2>&1
    echo "$1: exit $? after $(( $(date +%s) - started )) s" >> "$out/jobs.txt"
    cp "$2/accuracy.json" "$out/$1.json" 2>/dev/null
    grep -h '"event": "\(search\|epoch\)"' "$2/run/log.jsonl" > "$out/$1_log.jsonl" 2>/dev/null
}
( prepare 64 "$n64" 1 $work/d64 && accuracy acc64 $work/d64 64 "$n64" "$epochs64" 1 0 '{}' ) &
for seed in $seeds32; do
    prepare 32 "$n32" "$seed" $work/d32s$seed
    accuracy acc32s$seed $work/d32s$seed 32 "$n32" "$epochs" "$seed" "$simulated" "$model32" &
done
( timeout "$(left)" python3 bench/encoder_synthetic.py --star $work/d32s1/prep/train.star \
    --heldout $work/d32s1/prep/heldout.star --minutes "$minutes" --device "$device" --batch 512 \
    --report-every "$report_every" --encoder "$encoder_json" $encoder_flags > "$out/encoder.log" 2>&1
  echo "encoder: exit $? after $(( $(date +%s) - started )) s" >> "$out/jobs.txt" ) &
wait
cat "$out/jobs.txt"
[ "$device" = cpu ] || nvidia-smi --query-gpu=memory.used --format=csv >> "$out/gpu.txt"
for log in "$out"/*.log; do echo "== $log"; tr '\r' '\n' < "$log" | grep -v "batch/s\|it/s\]$\|img/s\]$" | tail -n 12; done
exit 0
