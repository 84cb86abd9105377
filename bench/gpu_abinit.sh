#!/usr/bin/env bash
# One GPU call for issue 3: the ab initio benchmarks on CUDA, four jobs side by side on one GPU, each under a
# deadline (a job cut off by it still leaves its log).
#
#   bash bench/gpu_abinit.sh OUT_DIR
#
#   A1, A2. bench/accuracy.py at D=32 (10,000 + 2,000 images; seeds 1 and 2, the two sets of bench/RESULTS.md; the
#      "em" teacher; EPOCHS epochs): the method on CUDA end to end (EM teacher, training, `cryofire infer`,
#      evaluation). Logs OUT/acc32s{1,2}.log, the run's search and epoch records OUT/acc32s{1,2}_log.jsonl,
#      results OUT/acc32s{1,2}.json.
#   B. The same at D=64 with N64 + 2,000 images (EPOCHS64 epochs): OUT/acc64.*.
#   C. bench/encoder_synthetic.py on CUDA for MINUTES: the encoder trained on unlimited fresh images from the
#      true-pose maps of the seed-1 set (batch 512): rotation error and states right against images seen,
#      OUT/encoder.log.
#
# A bare GPU machine has PyTorch but not mrcfile/starfile: wheels in .whl/ are installed into /tmp/site first.
# Dry run on a CPU (a few minutes):
#   DEVICE=cpu N32=600 N64=300 EPOCHS=1 EPOCHS64=1 MINUTES=0.5 REPORT_EVERY=2 EM_ITERATIONS=20 EM_STARTS=1 \
#       DEADLINE_S=1200 bash bench/gpu_abinit.sh OUT
set -uo pipefail
out=${1:?output folder}
device=${DEVICE:-cuda}
n32=${N32:-10000}
n64=${N64:-50000}
epochs=${EPOCHS:-10}
epochs64=${EPOCHS64:-2}
minutes=${MINUTES:-6}
report_every=${REPORT_EVERY:-100}
em_iterations=${EM_ITERATIONS:-700}  # the EM teacher's defaults (TrainConfig, EMConfig)
em_starts=${EM_STARTS:-4}
deadline=${DEADLINE_S:-540}          # seconds from the start until every job is stopped
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
train=$(printf '{"learning_rate": 1e-3, "search_fraction": 1.0, "teacher": "em", "device": "%s", "num_workers": 3, "em_iterations": %d, "em_starts": %d}' \
    "$device" "$em_iterations" "$em_starts")

# Data as accuracy.py prepares it (simulated at twice the box on the CPU, then Fourier-cropped); the D=32 sets first
# so that their jobs start while the D=64 set is simulated.
prepare() {  # box n_train seed folder
    python3 -c "import time; from pathlib import Path; from accuracy import prepare; t = time.time(); \
prepare(Path('$4'), $1, $2, 2000, $3); print('D=$1 seed $3: $2 + 2000 images prepared in %.0f s' % (time.time() - t))"
}
accuracy() {  # name folder box n_train epochs seed
    timeout "$(left)" python3 bench/accuracy.py --out "$2" --box "$3" --n-train "$4" --epochs "$5" --seed "$6" \
        --train "$train" > "$out/$1.log" 2>&1
    echo "$1: exit $? after $(( $(date +%s) - started )) s" >> "$out/jobs.txt"
}
for seed in 1 2; do prepare 32 "$n32" $seed $work/d32s$seed; done 2>&1 | grep prepared | tee "$out/prepare.log"
accuracy acc32s1 $work/d32s1 32 "$n32" "$epochs" 1 &
accuracy acc32s2 $work/d32s2 32 "$n32" "$epochs" 2 &
( timeout "$(left)" python3 bench/encoder_synthetic.py --star $work/d32s1/prep/train.star \
    --heldout $work/d32s1/prep/heldout.star --minutes "$minutes" --device "$device" --batch 512 \
    --report-every "$report_every" > "$out/encoder.log" 2>&1
  echo "encoder: exit $? after $(( $(date +%s) - started )) s" >> "$out/jobs.txt" ) &
prepare 64 "$n64" 1 $work/d64 2>&1 | grep prepared | tee -a "$out/prepare.log"
accuracy acc64 $work/d64 64 "$n64" "$epochs64" 1 &
wait
cat "$out/jobs.txt"
for name in acc32s1:d32s1 acc32s2:d32s2 acc64:d64; do
    cp $work/${name#*:}/accuracy.json "$out/${name%:*}.json" 2>/dev/null
    grep -h '"event": "\(search\|epoch\)"' $work/${name#*:}/run/log.jsonl > "$out/${name%:*}_log.jsonl" 2>/dev/null
done
[ "$device" = cpu ] || nvidia-smi --query-gpu=memory.used --format=csv >> "$out/gpu.txt"
for log in "$out"/*.log; do echo "== $log"; grep -v "it/s\]$" "$log" | tail -n 12; done
exit 0
