"""Side by side with cryoDRGN (issue 5): training images/s of `cryofire train --poses fixed` against
`cryodrgn train_vae` (fixed poses, its default architecture), and `cryodrgn abinit` for a bounded time, on the same
simulated dataset, on the same machine, in one run, with the same number of threads.

1. `cryofire simulate` (3,000 images, D=128, SNR 0.1, seed 11) and `cryofire preprocess --box 64` into
   <workdir>/sim and <workdir>/prep (reused when present). Our preprocess does not invert the contrast by default,
   and our simulated images are the projection times OUR CTF, which is minus cryoDRGN's (ours -sin(chi), cryoDRGN
   sin(gamma - atan(w / sqrt(1 - w^2))) with the same phase): cryoDRGN's default (it inverts the data) is therefore the
   right sign for these images, and no `--uninvert-data` is passed (the sign does not change the throughput).
2. cryoDRGN inputs from our RELION 3.1 star file with cryoDRGN's own tools: `cryodrgn parse_pose_star` and
   `cryodrgn parse_ctf_star` with -D and --Apix from the optics table; the translations and CTF it reads are checked
   against the star file. The images are read by cryoDRGN from the same star file (`--datadir` = its folder).
3. One after another, each in a fresh process with OMP/MKL/OpenBLAS threads = --threads (and cryoDRGN's
   --max-threads the same):
     ours_b32_default    cryofire train --poses fixed --epochs 1 (defaults: batch 32, frequency marching from 4 px
                         to D/2 over the first half of the planned images)
     ours_b32_full       the same with --marching-fraction 0 (the full radius D/2 from the first step, as cryoDRGN)
     ours_b16_full       batch 16 (cryoDRGN train_vae's default batch), full radius
     drgn_b16_default    cryodrgn train_vae --zdim 8 -n 1 (default architecture: encoder and decoder 3 x 1024,
                         batch 16)
     drgn_b32            the same with -b 32 (our default batch)
     ours_abinit_full    cryofire train --poses abinit --epochs 1 --marching-fraction 0 (our ab initio step at the
                         full radius, default batch 32 with the mirrored image), killed after --our-abinit-seconds
     drgn_abinit         cryodrgn abinit --zdim 8 (cryoDRGN-AI defaults, except --n-imgs-pretrain, default 192 here
                         instead of its 10,000, so that the pose-search epochs start within the bounded time), killed
                         after --abinit-seconds (one pose-search batch of 16 images took 3 to 5 min on one
                         thread here)
   A run that has not finished after its time limit (--ours-seconds, --drgn-seconds) is killed (its process group):
   images/s then come from its progress records. Steady images/s: images between the first and the last progress
   record over the wall time between them (the first record comes after a few steps, so start-up and the first
   steps are excluded); ours come from log.jsonl (step events, wall_time), cryoDRGN's from its
   "[Train Epoch: e/n] [k/N particles]" lines, time-stamped here as they arrive (unbuffered). Epoch images/s: N / (ours: epoch_seconds; cryoDRGN: its
   "Finished in" of the epoch) when the epoch completed. CPU s/image: CPU time (user + system, process tree,
   sampled from /proc) over the same window; less sensitive to other jobs on a shared machine than wall time.
   Peak RSS: the largest process's (wait4) and the largest sum over the process tree seen. First record s: from the
   launch to the first progress record (start-up: imports, reading the images, building the model, plus the first
   few steps).
4. A markdown table and the ratios ours / cryoDRGN on stdout; JSON in <workdir>/summary.json (or --out).

    .venv/bin/python bench/compare_cryodrgn.py --workdir /work/bench-data/compare_cryodrgn \\
        --cryodrgn-venv /work/bench-data/venv-cryodrgn --threads 1

cryoDRGN lives in its own venv (python3 -m venv DIR; DIR/bin/pip install torch==2.13.0 cryodrgn).
Time to a pose accuracy is not measured: our ab initio does not converge (see RESULTS.md), so the comparison of
time to 5 degrees against cryodrgn abinit cannot be made; only cryodrgn abinit's images/s per phase are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository, for a checkout without an install
from cryofire.io import read_star  # noqa: E402

BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
DRGN_PROGRESS = re.compile(r"\[Train Epoch: (\d+)/(\d+)\] \[(\d+)/(\d+) particles\]")
DRGN_EPOCH_VAE = re.compile(r"=====> Epoch: (\d+) .*Finished in ([0-9:.]+)")
DRGN_EPOCH_AI = re.compile(r"=====> (.*?)Epoch: (\d+) finished in ([0-9:.]+)")
DRGN_PHASE_START = re.compile(r"Will (pretrain on|use pose search on|use latent optimization on) (\d+) particles")


# --- processes ------------------------------------------------------------------------------------------------------
def tree_pids(root: int) -> list[int]:
    """root and its live descendants (from /proc/*/stat)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


def sample_tree(root: int) -> tuple[float, float]:
    """(CPU seconds of the tree incl. reaped children of the root, RSS MB summed over the tree)."""
    cpu, rss_pages = 0.0, 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is field 3 (state): utime=14, stime=15, cutime=16, cstime=17, rss=24
        ticks = int(fields[11]) + int(fields[12])
        if pid == root:
            ticks += int(fields[13]) + int(fields[14])
        cpu += ticks / CLOCK_TICKS
        rss_pages += int(fields[21])
    return cpu, rss_pages * PAGE_KB / 1024


def run_monitored(command: list[str], log: Path, env: dict, time_limit: float) -> dict:
    """Run `command` in its own session; its output (time-stamped on arrival) goes to `log`; killed after
    `time_limit` s. Returns wall time, lines [(time, text)], CPU samples [(time, cpu_s)], peak RSS, killed flag."""
    lines: list[tuple[float, str]] = []
    samples: list[tuple[float, float]] = []
    peak_tree_mb = 0.0
    started = time.time()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)

    def read() -> None:
        with open(log, "w") as out:
            # tqdm redraws with "\r": split on it too so that each update is a line
            buffer = b""
            while True:
                chunk = proc.stdout.read1(65536)
                if not chunk:
                    break
                buffer += chunk
                parts = re.split(rb"[\r\n]", buffer)
                buffer = parts.pop()
                now = time.time()
                for part in parts:
                    if part.strip():
                        text = part.decode(errors="replace")
                        lines.append((now, text))
                        out.write(f"[{now - started:9.3f}] {text}\n")
                out.flush()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed, status, usage = False, None, None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        now = time.time()
        cpu, rss = sample_tree(proc.pid)
        samples.append((now, cpu))
        peak_tree_mb = max(peak_tree_mb, rss)
        if not killed and now - started > time_limit:
            killed = True
            os.killpg(proc.pid, signal.SIGTERM)
            kill_at = now + 15
        if killed and now > kill_at:
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.25)
    proc.returncode = os.waitstatus_to_exitcode(status)
    ended = time.time()
    samples.append((ended, usage.ru_utime + usage.ru_stime))
    reader.join(timeout=10)
    if proc.returncode and not killed:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}); see {log}")
    return {"wall_s": ended - started, "started": started, "killed": killed, "returncode": proc.returncode,
            "lines": lines, "cpu_samples": samples, "cpu_s_total": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb_largest_process": usage.ru_maxrss / 1024, "peak_rss_mb_tree": peak_tree_mb}


def run_quiet(command: list[str], log: Path, env: dict | None = None) -> None:
    with open(log, "w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}); see {log}")


def cpu_at(samples: list[tuple[float, float]], when: float) -> float:
    times, values = zip(*samples)
    return float(np.interp(when, times, values))


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def parse_timedelta(text: str) -> float:
    hours, minutes, seconds = text.split(":")
    return timedelta(hours=int(hours), minutes=int(minutes), seconds=float(seconds)).total_seconds()


# --- rates ----------------------------------------------------------------------------------------------------------
def window_rate(records: list[tuple[float, int]], samples: list, skip: int = 1) -> dict:
    """images/s and CPU s/image between the (skip+1)-th and the last progress record (time, images)."""
    records = records[skip:]
    if len(records) < 2:
        return {"steady_images_per_s": None, "cpu_s_per_image": None, "window_images": 0, "window_s": 0.0}
    (t0, n0), (t1, n1) = records[0], records[-1]
    images, seconds = n1 - n0, t1 - t0
    cpu = cpu_at(samples, t1) - cpu_at(samples, t0)
    return {"steady_images_per_s": images / seconds, "cpu_s_per_image": cpu / images,
            "window_images": images, "window_s": seconds}


def ours_result(run_dir: Path, mon: dict, n_images: int) -> dict:
    records, epoch = [], None
    log = run_dir / "log.jsonl"
    for line in log.read_text().splitlines() if log.exists() else []:
        event = json.loads(line)
        if event["event"] == "step" and event["epoch"] == 0:
            records.append((event["wall_time"], event["images_seen"], event.get("radius_px")))
        elif event["event"] == "epoch" and event["epoch"] == 1:
            epoch = event
    result = window_rate([(t, n) for t, n, _ in records], mon["cpu_samples"])
    # the part of the epoch at the full radius (the marching run reaches D/2 halfway)
    full = [(t, n) for t, n, r in records if r is not None and r >= records[-1][2] - 1e-6] if records else []
    result["steady_full_radius_images_per_s"] = window_rate(full, mon["cpu_samples"], skip=0)["steady_images_per_s"]
    result["startup_s"] = records[0][0] - mon["started"] if records else None
    if epoch:
        result["epoch_s"] = epoch["epoch_seconds"]
        result["epoch_images_per_s"] = epoch["images_seen"] / epoch["epoch_seconds"]
    else:
        result["epoch_s"] = result["epoch_images_per_s"] = None
    result["images_done"] = records[-1][1] if records else 0
    return result


def drgn_vae_result(mon: dict, n_images: int) -> dict:
    records, epoch_s = [], None
    for when, text in mon["lines"]:
        if match := DRGN_PROGRESS.search(text):
            records.append((when, int(match.group(3))))
        elif match := DRGN_EPOCH_VAE.search(text):
            epoch_s = parse_timedelta(match.group(2))
    result = window_rate(records, mon["cpu_samples"])
    result["startup_s"] = records[0][0] - mon["started"] if records else None
    result["epoch_s"] = epoch_s
    result["epoch_images_per_s"] = n_images / epoch_s if epoch_s else None
    result["images_done"] = records[-1][1] if records else 0
    return result


def drgn_abinit_result(mon: dict, hps_batch: int = 16) -> dict:
    """Per epoch (0: pretraining on random poses; then hierarchical pose search, HPS; then SGD on a pose table):
    images/s between records, images/s from the epoch's start, seconds per logged batch, epoch time if finished.
    An epoch that started but logged no batch before the kill gets an upper bound: one batch over the time since its
    start."""
    phases: dict[int, dict] = {}
    starts: list[tuple[float, str]] = []
    for when, text in mon["lines"]:
        if match := DRGN_PHASE_START.search(text):
            starts.append((when, match.group(1)))
        elif match := DRGN_PROGRESS.search(text):
            phases.setdefault(int(match.group(1)), {"records": []})["records"].append((when, int(match.group(3))))
        elif match := DRGN_EPOCH_AI.search(text):
            phase = phases.setdefault(int(match.group(2)), {"records": []})
            phase["epoch_s"] = parse_timedelta(match.group(3))
    for epoch in range(len(starts)):  # the epochs are numbered from 0 (with pretraining) in order of their start
        phases.setdefault(epoch, {"records": []})
    labels = {"pretrain on": "pretraining (random poses, batch 64)",
              "use pose search on": f"hierarchical pose search (batch {hps_batch})",
              "use latent optimization on": "SGD on the pose table (batch 128)"}
    out = {}
    for epoch, phase in sorted(phases.items()):
        records = phase.pop("records")
        phase.update(window_rate(records, mon["cpu_samples"]))
        phase["images_done"] = records[-1][1] if records else 0
        start, kind = starts[epoch] if epoch < len(starts) else (None, None)
        phase["phase"] = labels.get(kind, f"epoch {epoch}")
        # from the epoch's start (its "Will ... on N particles" line) to its last record: includes the first batch
        # and the data loader's start; the only rate when an epoch has fewer than three records
        phase["since_epoch_start_images_per_s"] = phase["upper_bound_images_per_s"] = None
        if start is not None and records:
            phase["since_epoch_start_images_per_s"] = records[-1][1] / (records[-1][0] - start)
            phase["since_epoch_start_s"] = records[-1][0] - start
            phase["since_epoch_start_cpu_s_per_image"] = (cpu_at(mon["cpu_samples"], records[-1][0]) -
                                                          cpu_at(mon["cpu_samples"], start)) / records[-1][1]
            phase["seconds_per_batch"] = [round(b[0] - a[0], 2) for a, b in zip([(start, 0)] + records, records)]
        elif start is not None:
            waited = mon["started"] + mon["wall_s"] - start
            phase["no_batch_within_s"] = waited
            phase["upper_bound_images_per_s"] = (hps_batch if kind == "use pose search on" else 64) / waited
        out[str(epoch)] = phase
    first = next((when for when, text in mon["lines"] if DRGN_PROGRESS.search(text)), None)
    return {"epochs": out, "startup_s": first - mon["started"] if first else None}


# --- data -----------------------------------------------------------------------------------------------------------
def prepare(args: argparse.Namespace, env: dict) -> Path:
    work = args.workdir
    sim, prep = work / "sim", work / "prep"
    if not (sim / "particles.star").exists():
        run_quiet([str(BIN / "cryofire"), "simulate", "-o", str(sim), "-n", str(args.n_images), "--box",
                   str(args.sim_box), "--snr", str(args.snr), "--seed", str(args.seed)], work / "simulate.log", env)
    if not (prep / "particles.star").exists():
        run_quiet([str(BIN / "cryofire"), "preprocess", str(sim / "particles.star"), "-o", str(prep), "--box",
                   str(args.box)], work / "preprocess.log", env)
    return prep / "particles.star"


def convert(star: Path, drgn_bin: Path, out: Path, env: dict) -> dict:
    """pose.pkl and ctf.pkl by cryoDRGN's parse_pose_star / parse_ctf_star, checked against the star file."""
    table = read_star(star)
    size = int(table["rlnImageSize"].iloc[0])
    apix = float(table["rlnImagePixelSize"].iloc[0])
    out.mkdir(parents=True, exist_ok=True)
    poses, ctf = out / "pose.pkl", out / "ctf.pkl"
    if not poses.exists():
        run_quiet([str(drgn_bin / "cryodrgn"), "parse_pose_star", str(star), "-o", str(poses), "-D", str(size),
                   "--Apix", str(apix)], out / "parse_pose_star.log", env)
    if not ctf.exists():
        run_quiet([str(drgn_bin / "cryodrgn"), "parse_ctf_star", str(star), "-o", str(ctf), "-D", str(size),
                   "--Apix", str(apix)], out / "parse_ctf_star.log", env)
    with open(poses, "rb") as handle:
        rotations, translations = pickle.load(handle)
    with open(ctf, "rb") as handle:
        ctf_table = np.asarray(pickle.load(handle))
    origin_px = table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(np.float64) / apix
    checks = {
        "box": size, "apix": apix, "n_poses": len(rotations), "n_ctf": len(ctf_table),
        # cryoDRGN stores the translation as a fraction of the box
        "translation_max_abs_diff_px": float(np.abs(np.abs(translations * size) - np.abs(origin_px)).max()),
        "ctf_defocus_u_max_abs_diff": float(np.abs(ctf_table[:, 2] - table["rlnDefocusU"].to_numpy()).max()),
        "ctf_box_apix": [float(ctf_table[0, 0]), float(ctf_table[0, 1])],
    }
    # cryoDRGN keeps the CTF table in float32 (defocus ~2e4 A: steps of ~2e-3 A)
    defocus_tolerance = 1e-6 * float(np.abs(table["rlnDefocusU"].to_numpy()).max())
    if checks["n_poses"] != len(table) or checks["translation_max_abs_diff_px"] > 1e-4 or \
            checks["ctf_defocus_u_max_abs_diff"] > defocus_tolerance or checks["ctf_box_apix"] != [size, apix]:
        raise SystemExit(f"cryoDRGN inputs disagree with {star}: {checks}")
    return checks


# --- main -----------------------------------------------------------------------------------------------------------
def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/work/bench-data/compare_cryodrgn"))
    parser.add_argument("--cryodrgn-venv", type=Path, default=Path("/work/bench-data/venv-cryodrgn"))
    parser.add_argument("-n", "--n-images", type=int, default=3000)
    parser.add_argument("--sim-box", type=int, default=128)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of every run (default 1)")
    parser.add_argument("--ours-seconds", type=float, default=300.0, help="time limit of our fixed-pose runs (s)")
    parser.add_argument("--drgn-seconds", type=float, default=180.0, help="time limit of the train_vae runs (s)")
    parser.add_argument("--our-abinit-seconds", type=float, default=150.0, help="s of our ab initio run (0: skip)")
    parser.add_argument("--abinit-seconds", type=float, default=480.0, help="s of cryodrgn abinit (0: skip)")
    parser.add_argument("--abinit-pretrain-images", type=int, default=192,
                        help="cryodrgn abinit --n-imgs-pretrain (its default 10,000)")
    parser.add_argument("--runs", nargs="*", help="only these runs (names as in the docstring)")
    parser.add_argument("--out", type=Path, help="JSON summary (default <workdir>/summary.json)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    drgn_bin = args.cryodrgn_venv / "bin"
    if not (drgn_bin / "cryodrgn").exists():
        raise SystemExit(f"no cryodrgn in {drgn_bin}: python3 -m venv {args.cryodrgn_venv} && "
                         f"{drgn_bin}/pip install torch==2.13.0 cryodrgn")

    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
           "PYTHONUNBUFFERED": "1"}
    star = prepare(args, env)
    n_images = len(read_star(star))
    checks = convert(star, drgn_bin, args.workdir / "drgn_inputs", env)
    runs_dir = args.workdir / "runs"
    runs_dir.mkdir(exist_ok=True)

    ours = [str(BIN / "cryofire"), "train", str(star), "--poses", "fixed", "--epochs", "1", "--device", "cpu"]
    drgn_common = ["--datadir", str(star.parent), "--poses", str(args.workdir / "drgn_inputs" / "pose.pkl"),
                   "--ctf", str(args.workdir / "drgn_inputs" / "ctf.pkl"), "--zdim", "8", "-n", "1",
                   "--no-analysis", "--max-threads", threads]
    plan = {
        "ours_b32_default": ("ours", 32, "marching 4 px -> D/2 over the first half", ours + ["--log-every-steps", "5"]),
        "ours_b32_full": ("ours", 32, "D/2", ours + ["--marching-fraction", "0", "--log-every-steps", "5"]),
        "ours_b16_full": ("ours", 16, "D/2", ours + ["--batch-size", "16", "--marching-fraction", "0",
                                                      "--log-every-steps", "10"]),
        "drgn_b16_default": ("cryodrgn", 16, "D/2", [str(drgn_bin / "cryodrgn"), "train_vae", str(star),
                                                      *drgn_common, "--log-interval", "32"]),
        "drgn_b32": ("cryodrgn", 32, "D/2", [str(drgn_bin / "cryodrgn"), "train_vae", str(star), *drgn_common,
                                              "-b", "32", "--log-interval", "32"]),
    }
    limits = {name: args.ours_seconds if name.startswith("ours") else args.drgn_seconds for name in plan}
    if args.our_abinit_seconds > 0:
        plan["ours_abinit_full"] = ("ours", 32, "D/2", [str(BIN / "cryofire"), "train", str(star), "--poses", "abinit",
                                                        "--epochs", "1", "--device", "cpu", "--marching-fraction", "0",
                                                        "--log-every-steps", "2"])
        limits["ours_abinit_full"] = args.our_abinit_seconds
    if args.abinit_seconds > 0:
        plan["drgn_abinit"] = ("cryodrgn", None, "cryoDRGN-AI defaults",
                               [str(drgn_bin / "cryodrgn"), "abinit", str(star), "--datadir", str(star.parent),
                                "--ctf", str(args.workdir / "drgn_inputs" / "ctf.pkl"), "--zdim", "8",
                                "--max-threads", threads, "--log-interval", "16", "--no-analysis",
                                "--n-imgs-pretrain", str(args.abinit_pretrain_images)])
        limits["drgn_abinit"] = args.abinit_seconds
    if args.runs:
        plan = {name: plan[name] for name in args.runs}

    results = {}
    for name, (tool, batch, radius, command) in plan.items():
        out = runs_dir / name
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        command = command + ["-o", str(out)]
        limit = limits[name]
        before = loadavg()
        print(f"[{time.strftime('%H:%M:%S')}] {name}: load {before}", file=sys.stderr, flush=True)
        mon = run_monitored(command, runs_dir / f"{name}.log", env, limit)
        after = loadavg()
        if name == "drgn_abinit":
            rates = drgn_abinit_result(mon)
        elif tool == "ours":
            rates = ours_result(out, mon, n_images)
        else:
            rates = drgn_vae_result(mon, n_images)
        results[name] = {
            "tool": tool, "batch_size": batch, "radius": radius, "command": " ".join(command),
            "wall_s": mon["wall_s"], "killed_at_time_limit": mon["killed"], "cpu_s_total": mon["cpu_s_total"],
            "peak_rss_mb_largest_process": mon["peak_rss_mb_largest_process"],
            "peak_rss_mb_tree": mon["peak_rss_mb_tree"], "loadavg_before": before, "loadavg_after": after, **rates,
        }
        print(json.dumps({name: {k: v for k, v in results[name].items() if k != "command"}}, default=str),
              file=sys.stderr, flush=True)

    def ratio(a: str, b: str, key: str) -> float | None:
        if a in results and b in results and results[a].get(key) and results[b].get(key):
            if key == "cpu_s_per_image":  # less CPU per image is better: cryoDRGN / ours
                return results[b][key] / results[a][key]
            return results[a][key] / results[b][key]
        return None

    pairs = {
        "defaults (ours batch 32, full radius / cryoDRGN batch 16)": ("ours_b32_full", "drgn_b16_default"),
        "defaults, 1-epoch run with our frequency marching / cryoDRGN batch 16": ("ours_b32_default",
                                                                                  "drgn_b16_default"),
        "matched batch 16 (full radius)": ("ours_b16_full", "drgn_b16_default"),
        "matched batch 32 (full radius)": ("ours_b32_full", "drgn_b32"),
    }
    ratios = {label: {key: ratio(a, b, key) for key in ("steady_images_per_s", "epoch_images_per_s",
                                                        "cpu_s_per_image")} | {"ours": a, "cryodrgn": b}
              for label, (a, b) in pairs.items()}
    if "ours_abinit_full" in results and "drgn_abinit" in results:
        ours_rate = results["ours_abinit_full"]["steady_images_per_s"]
        epochs = [p for e, p in results["drgn_abinit"]["epochs"].items() if e != "0"]
        searched = [p.get("steady_images_per_s") or p.get("since_epoch_start_images_per_s") for p in epochs]
        searched = [rate for rate in searched if rate]
        searched_cpu = [p.get("cpu_s_per_image") or p.get("since_epoch_start_cpu_s_per_image") for p in epochs]
        searched_cpu = [cpu for cpu in searched_cpu if cpu]
        ours_cpu = results["ours_abinit_full"]["cpu_s_per_image"]
        bound = [p["upper_bound_images_per_s"] for p in epochs if p.get("upper_bound_images_per_s")]
        pretrain = results["drgn_abinit"]["epochs"].get("0", {}).get("steady_images_per_s")
        ratios["ab initio images/s: ours (full radius) / cryodrgn abinit pose search"] = {
            "steady_images_per_s": ours_rate / searched[0] if ours_rate and searched else None,
            "at_least": ours_rate / bound[0] if ours_rate and bound and not searched else None,
            "cpu_s_per_image": searched_cpu[0] / ours_cpu if ours_cpu and searched_cpu else None,
            "ours": "ours_abinit_full", "cryodrgn": "drgn_abinit (first pose-search epoch)"}
        ratios["ab initio images/s: ours (full radius) / cryodrgn abinit pretraining"] = {
            "steady_images_per_s": ours_rate / pretrain if ours_rate and pretrain else None,
            "cpu_s_per_image": (results["drgn_abinit"]["epochs"].get("0", {}).get("cpu_s_per_image") or 0) / ours_cpu
            if ours_cpu else None,
            "ours": "ours_abinit_full", "cryodrgn": "drgn_abinit (pretraining, no search)"}
    def python_torch(python: Path) -> str:
        return subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                              text=True).stdout.strip()

    versions = {
        "cryofire": subprocess.run([str(BIN / "cryofire"), "--version"], capture_output=True, text=True).stdout.strip(),
        "cryodrgn": subprocess.run([str(drgn_bin / "cryodrgn"), "--version"], capture_output=True,
                                   text=True).stdout.strip(),
        "torch": python_torch(BIN / "python"),
        "torch_cryodrgn_venv": python_torch(drgn_bin / "python"),
    }
    summary = {"dataset": {"star": str(star), "n_images": n_images, "box": args.box, "sim_box": args.sim_box,
                           "snr": args.snr, "seed": args.seed}, "threads": args.threads, "cpus": os.cpu_count(),
               "versions": versions, "conversion_checks": checks, "runs": results, "ratios": ratios}
    out_path = args.out or args.workdir / "summary.json"
    out_path.write_text(json.dumps(summary, indent=1, default=str))

    print(f"\nD={args.box}, {n_images} images, {args.threads} thread(s), {os.cpu_count()} CPUs; "
          f"{versions['cryodrgn']}, {versions['cryofire']}, torch {versions['torch']}\n")
    print("| run | batch | radius fitted | images/s (steady) | images/s (epoch) | CPU s/image | first record s | "
          "wall s | peak RSS MB | load before |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if name == "drgn_abinit":
            continue
        print(f"| {name} | {r['batch_size']} | {r['radius']} | {fmt(r['steady_images_per_s'])} | "
              f"{fmt(r['epoch_images_per_s'])} | {fmt(r['cpu_s_per_image'], 3)} | {fmt(r['startup_s'], 1)} | "
              f"{fmt(r['wall_s'], 0)}{' (killed)' if r['killed_at_time_limit'] else ''} | "
              f"{fmt(r['peak_rss_mb_largest_process'], 0)} | {r['loadavg_before'][0]:.2f} |")
    print("\n| ratio ours / cryoDRGN | images/s steady | images/s epoch | CPU per image (cryoDRGN / ours) |")
    print("|---|---|---|---|")
    for label, r in ratios.items():
        steady = f"> {fmt(r['at_least'])}" if r.get("at_least") else fmt(r["steady_images_per_s"])
        print(f"| {label} | {steady} | {fmt(r.get('epoch_images_per_s'))} | {fmt(r.get('cpu_s_per_image'))} |")
    if "drgn_abinit" in results:
        r = results["drgn_abinit"]
        print(f"\ncryodrgn abinit, {fmt(r['wall_s'], 0)} s{' (killed)' if r['killed_at_time_limit'] else ''}, "
              f"first record {fmt(r['startup_s'], 1)} s, peak RSS {fmt(r['peak_rss_mb_largest_process'], 0)} MB "
              f"(tree {fmt(r['peak_rss_mb_tree'], 0)} MB):")
        print("\n| epoch | phase | images done | images/s (steady) | images/s since epoch start | CPU s/image | "
              "epoch s |")
        print("|---|---|---|---|---|---|---|")
        for epoch, p in r["epochs"].items():
            since = (f"< {fmt(p['upper_bound_images_per_s'], 3)} (no batch in {fmt(p['no_batch_within_s'], 0)} s)"
                     if p.get("upper_bound_images_per_s") else fmt(p["since_epoch_start_images_per_s"], 3))
            print(f"| {epoch} | {p['phase']} | {p['images_done']} | {fmt(p['steady_images_per_s'])} | "
                  f"{since} | {fmt(p['cpu_s_per_image'] or p.get('since_epoch_start_cpu_s_per_image'), 3)} | "
                  f"{fmt(p.get('epoch_s'), 1)} |")
    print(f"\nJSON: {out_path}")


if __name__ == "__main__":
    main()
