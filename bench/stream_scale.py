"""Issue 5 target: training streams a 1,000,000-image D=128 dataset in bounded memory.

The data are SYNTHETIC and FLOAT16: Gaussian noise plus a faint Gaussian blob per image, written as MRC mode 12
(float16) stacks, so 1,000,000 images at D=128 take 32.8 GB on disk instead of 65.5 GB as float32. The content is
irrelevant to what is measured (resident memory, reading speed): every image is read with the same pread whatever
its pixels. No physics simulation (it would take ~30 min and 65 GB here).

Sub-commands (each prints a JSON summary; ``all`` runs the whole benchmark and writes <dir>/summary.json):

    .venv/bin/python bench/stream_scale.py make --out /work/bench-data/stream1m -n 1000000 --box 128
        streaming writer: stacks/stream_NNNN.mrcs of 10,000 images (one chunk of 1,000 images in memory at a time),
        particles.star (RELION 3.1: optics group, CTF, random angles and origins so ``--poses fixed`` works) and
        particles_10k.star (10,000 random rows of the same stacks). Each stack is fdatasync'ed and dropped from the
        page cache (POSIX_FADV_DONTNEED) once written.
    .venv/bin/python bench/stream_scale.py table --star S        RSS of read_particles and of ParticleImages
    .venv/bin/python bench/stream_scale.py loader --star S --workers W --seconds 30 [--cold]
        ParticleImages + make_loader (batch 128, shuffled) alone: images/s and memory; --cold drops the stacks from
        the page cache first (posix_fadvise DONTNEED on every stack).
    .venv/bin/python bench/stream_scale.py memory --star S --images 20000 --seconds 20
        the in-memory reference: N images read into one float32 tensor, random batches of 128 indexed from it.
    .venv/bin/python bench/stream_scale.py train --star S --seconds 180 --run-dir R [--workers 2]
        `cryofire train --poses fixed` with a tiny model under /usr/bin/time -v, stopped (SIGTERM) after a fixed wall
        time; peak RSS (VmHWM of the trainer, and the peak of the summed PSS of the trainer and its DataLoader
        workers, sampled every 0.5 s) and images/s from log.jsonl's step events.
    .venv/bin/python bench/stream_scale.py all --dir /work/bench-data/stream1m [--cleanup]

Memory is reported in MB (1e6 bytes). ``all`` waits (up to 15 min) while a cryoDRGN benchmark runs on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository, for a checkout without an install
from mrcfile.dtypes import HEADER_DTYPE  # noqa: E402

from cryofire.io import write_star  # noqa: E402
from cryofire.io.mrc import StackWriter  # noqa: E402

BIN = Path(sys.executable).parent
PIXEL_SIZE = 1.5
IMAGES_PER_STACK = 10_000
CHUNK = 1_000
BATCH = 128
# A deliberately small model and a constant frequency radius, so that the 1M and 10k runs do the same work per step
# (the radius schedule and the pose-only phase depend on the planned number of images).
TRAIN_OPTIONS = ["--poses", "fixed", "--batch-size", str(BATCH), "--encoder-channels", "8", "--encoder-max-channels",
                 "32", "--encoder-hidden-dim", "32", "--decoder-width", "32", "--decoder-depth", "1",
                 "--num-fourier-features", "16", "--zdim", "2", "--start-radius-px", "8", "--max-radius-px", "8",
                 "--pose-only-fraction", "0", "--log-every-steps", "5", "--device", "cpu"]


# ---------------------------------------------------------------- memory helpers

def _status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM of a process in bytes."""
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def _pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def _tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as handle:
                todo += [int(c) for c in handle.read().split()]
        except OSError:
            pass
    return out


class TreeSampler(threading.Thread):
    """Samples every `interval` s the summed PSS and RSS of a process tree; keeps the peaks."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_pss = self.peak_rss = self.peak_processes = 0
        self.hwm: dict[int, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def sample(self) -> None:
        pss = rss = 0
        pids = _tree(self.pid)
        for p in pids:
            try:
                status = _status(p)
                rss += status["VmRSS"]
                self.hwm[p] = max(self.hwm.get(p, 0), status["VmHWM"])
                pss += _pss(p)
            except (OSError, KeyError):
                pass
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
        self.peak_processes = max(self.peak_processes, len(pids))

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        return {"peak_tree_pss_mb": self.peak_pss / 1e6, "peak_tree_rss_mb": self.peak_rss / 1e6,
                "max_processes": self.peak_processes}


def _mb(nbytes: float) -> float:
    return round(nbytes / 1e6, 1)


def drop_cache(paths) -> float:
    """posix_fadvise(DONTNEED) on each file (clean pages leave the page cache); returns the seconds taken."""
    start = time.perf_counter()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return time.perf_counter() - start


def wait_for_cryodrgn(limit_s: float = 900.0, poll_s: float = 30.0) -> float:
    """Wait while a cryoDRGN process runs (another benchmark); gives up after `limit_s`. Returns seconds waited."""
    start = time.time()
    while time.time() - start < limit_s:
        busy = subprocess.run(["pgrep", "-f", "cryodrgn"], capture_output=True, text=True).stdout.strip()
        if not busy:
            return time.time() - start
        print(f"cryoDRGN running ({busy.split()}), waiting", file=sys.stderr, flush=True)
        time.sleep(poll_s)
    print("gave up waiting for cryoDRGN after", limit_s, "s", file=sys.stderr, flush=True)
    return -(time.time() - start)


# ---------------------------------------------------------------- make

class Float16StackWriter(StackWriter):
    """cryofire's streaming StackWriter, storing MRC mode 12 (float16) instead of float32.

    The header statistics (min, max, mean, rms) come from every 10th image (cheap; readers ignore them).
    """

    def write(self, chunk: np.ndarray) -> None:
        chunk = np.ascontiguousarray(chunk, dtype="<f2")
        written, self.n_images = self.n_images, getattr(self, "_sampled", 0)  # statistics count sampled images
        self._update_statistics(chunk[::10].astype(np.float32))
        self._sampled, self.n_images = self.n_images, written + len(chunk)
        self._file.write(memoryview(chunk).cast("B"))

    def _header_bytes(self) -> bytes:
        written, self.n_images = self.n_images, getattr(self, "_sampled", 0)
        try:
            header = np.frombuffer(super()._header_bytes(), dtype=HEADER_DTYPE.newbyteorder("<")).copy()
        finally:
            self.n_images = written
        header["nz"], header["mode"] = written, 12
        return header.tobytes()


class SyntheticImages:
    """Images of unit Gaussian noise plus a faint Gaussian blob (amplitude 0.5, sigma box/16) at a random place.

    For speed the noise of each image is drawn from a bank of 4,096 precomputed float16 noise images (so noise
    fields repeat across the data set: the content does not matter for memory or reading speed).
    """

    BANK = 4096

    def __init__(self, box: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.box = box
        self.bank = self.rng.standard_normal((self.BANK, box, box), dtype=np.float32).astype(np.float16)
        half = 3 * max(box // 16, 1)
        grid = np.arange(-half, half, dtype=np.float32)
        blob = 0.5 * np.exp(-0.5 * (grid / (box / 16)) ** 2)
        self.blob = (blob[:, None] * blob[None, :]).astype(np.float16)

    def __call__(self, n: int) -> np.ndarray:
        images = self.bank[self.rng.integers(0, self.BANK, n)]  # a copy
        size = self.blob.shape[0]
        corners = self.rng.integers(int(self.box * 0.3) - size // 2, int(self.box * 0.7) - size // 2, (n, 2))
        for image, (y, x) in zip(images, corners):
            image[y:y + size, x:x + size] += self.blob
        return images


def particle_table(stacks: list[Path], counts: list[int], box: int, seed: int) -> pd.DataFrame:
    n = sum(counts)
    rng = np.random.default_rng(seed + 1)
    table = pd.DataFrame({
        "image_path": np.repeat(np.array([str(s) for s in stacks], dtype=object), counts),
        "image_index": np.concatenate([np.arange(c) for c in counts]).astype(np.int64),
    })
    defocus_u = rng.uniform(10_000.0, 25_000.0, n)
    table["rlnDefocusU"] = defocus_u
    table["rlnDefocusV"] = defocus_u - rng.uniform(0.0, 500.0, n)
    table["rlnDefocusAngle"] = rng.uniform(-180.0, 180.0, n)
    table["rlnPhaseShift"] = 0.0
    table["rlnCtfBfactor"] = 0.0
    table["rlnAngleRot"] = rng.uniform(-180.0, 180.0, n)
    table["rlnAngleTilt"] = np.rad2deg(np.arccos(rng.uniform(-1.0, 1.0, n)))
    table["rlnAnglePsi"] = rng.uniform(-180.0, 180.0, n)
    table["rlnOriginXAngst"] = rng.normal(0.0, 2.0, n) * PIXEL_SIZE
    table["rlnOriginYAngst"] = rng.normal(0.0, 2.0, n) * PIXEL_SIZE
    optics = {"rlnVoltage": 300.0, "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1,
              "rlnImagePixelSize": PIXEL_SIZE, "rlnImageSize": box, "rlnOpticsGroup": 1}
    for column, value in optics.items():
        table[column] = value
    return table


def make(out: Path, n: int, box: int, seed: int, subset: int) -> dict:
    stack_dir = out / "stacks"
    stack_dir.mkdir(parents=True, exist_ok=True)
    synthetic = SyntheticImages(box, seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    stacks, counts, written = [], [], 0
    while written < n:
        count = min(IMAGES_PER_STACK, n - written)
        path = stack_dir / f"stream_{len(stacks):04d}.mrcs"
        with Float16StackWriter(path, box, PIXEL_SIZE) as writer:
            for first in range(0, count, CHUNK):
                writer.write(synthetic(min(CHUNK, count - first)))
        fd = os.open(path, os.O_RDONLY)
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        stacks.append(path)
        counts.append(count)
        written += count
        if len(stacks) % 10 == 0:
            print(f"{written} images, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    stack_seconds = time.perf_counter() - start
    table = particle_table(stacks, counts, box, seed)
    write_star(out / "particles.star", table)
    small = np.sort(np.random.default_rng(seed + 2).choice(n, size=min(subset, n), replace=False))
    write_star(out / f"particles_{subset // 1000}k.star", table.iloc[small])
    stack_bytes = sum(p.stat().st_size for p in stacks)
    return {"images": n, "box": box, "dtype": "float16 (MRC mode 12)", "stacks": len(stacks),
            "stack_gb": stack_bytes / 1e9, "float32_equivalent_gb": n * box * box * 4 / 1e9,
            "star_mb": (out / "particles.star").stat().st_size / 1e6,
            "stack_write_seconds": stack_seconds, "total_seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start,
            "write_mb_per_s": stack_bytes / 1e6 / stack_seconds, "peak_rss_mb": _mb(_status()["VmHWM"])}


# ---------------------------------------------------------------- table, loader, in-memory

def _load(star: Path):
    from cryofire.io import read_particles
    from cryofire.train.data import ParticleImages
    result = {"rss_start_mb": _mb(_status()["VmRSS"])}
    start = time.perf_counter()
    table = read_particles(star)
    status = _status()
    result.update(rows=len(table), read_particles_seconds=time.perf_counter() - start,
                  rss_after_read_particles_mb=_mb(status["VmRSS"]), hwm_after_read_particles_mb=_mb(status["VmHWM"]),
                  table_memory_usage_deep_mb=_mb(table.memory_usage(deep=True).sum()))
    start = time.perf_counter()
    dataset = ParticleImages(table)
    status = _status()
    result.update(particle_images_seconds=time.perf_counter() - start,
                  rss_after_particle_images_mb=_mb(status["VmRSS"]),
                  hwm_after_particle_images_mb=_mb(status["VmHWM"]))
    return table, dataset, result


def table_rss(star: Path) -> dict:
    _, _, result = _load(star)
    return result


def loader(star: Path, workers: int, seconds: float, cold: bool) -> dict:
    from cryofire.train.data import make_loader
    table, dataset, result = _load(star)
    if cold:
        result["drop_cache_seconds"] = drop_cache(table["image_path"].unique())
    sampler = TreeSampler(os.getpid())
    sampler.start()
    batches = images = 0
    start = time.perf_counter()
    first_batch = None
    epoch = 0
    while time.perf_counter() - start < seconds:
        for batch in make_loader(dataset, BATCH, True, 0, epoch, workers, False):
            batches += 1
            images += len(batch["index"])
            if first_batch is None:
                first_batch = time.perf_counter() - start
            if time.perf_counter() - start >= seconds:
                break
        epoch += 1
    elapsed = time.perf_counter() - start
    result.update(sampler.stop(), workers=workers, cold=cold, batches=batches, images=images, seconds=elapsed,
                  first_batch_seconds=first_batch, images_per_s=images / elapsed,
                  mb_per_s_from_disk_float16=images * dataset.image_size**2 * 2 / 1e6 / elapsed,
                  main_hwm_mb=_mb(_status()["VmHWM"]))
    return result


def in_memory(star: Path, n_images: int, seconds: float) -> dict:
    import torch
    table, dataset, result = _load(star)
    rows = np.sort(np.random.default_rng(0).choice(len(table), size=min(n_images, len(table)), replace=False))
    start = time.perf_counter()
    images = torch.from_numpy(np.concatenate([dataset.source[rows[i:i + 1000]] for i in range(0, len(rows), 1000)]))
    ctf = dataset.ctf_parameters[rows]
    rotations, origins = dataset.poses[0][rows], dataset.poses[1][rows]
    result["load_seconds"] = time.perf_counter() - start
    generator = torch.Generator().manual_seed(0)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for index in torch.randperm(len(rows), generator=generator).split(BATCH):
            if len(index) < BATCH:
                continue
            batch = {"index": index, "images": images[index], "ctf_parameters": ctf[index],
                     "rotations": rotations[index], "origins_px": origins[index]}
            count += len(batch["images"])
            if time.perf_counter() - start >= seconds:
                break
    elapsed = time.perf_counter() - start
    result.update(in_memory_images=len(rows), tensor_mb=_mb(images.numel() * 4), images=count, seconds=elapsed,
                  images_per_s=count / elapsed, main_hwm_mb=_mb(_status()["VmHWM"]))
    return result


# ---------------------------------------------------------------- train

def train(star: Path, seconds: float, run_dir: Path, workers: int) -> dict:
    if (run_dir / "log.jsonl").exists():
        (run_dir / "log.jsonl").unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    for leftover in ("checkpoint.pt", "config.yaml"):
        if (run_dir / leftover).exists():
            (run_dir / leftover).unlink()
    command = ["/usr/bin/time", "-v", str(BIN / "cryofire"), "train", str(star), "-o", str(run_dir),
               "--epochs", "1000" if "10k" in star.name else "1", "--num-workers", str(workers), *TRAIN_OPTIONS]
    time_log = run_dir / "time.log"
    start = time.perf_counter()
    with open(time_log, "w") as log:
        timer = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        trainer_pid = None
        while trainer_pid is None and time.perf_counter() - start < 30:
            children = _tree(timer.pid)[1:]
            trainer_pid = children[0] if children else None
            time.sleep(0.05)
        sampler = TreeSampler(trainer_pid)
        sampler.start()
        stopped = False
        while timer.poll() is None:
            if time.perf_counter() - start > seconds:
                sampler.sample()
                hwm = _status(trainer_pid)["VmHWM"]
                os.kill(trainer_pid, signal.SIGTERM)
                stopped = True
                break
            time.sleep(0.5)
        timer.wait(timeout=60)
    wall = time.perf_counter() - start
    memory = sampler.stop()
    text = time_log.read_text()
    max_rss = [int(line.split(":")[-1]) * 1024 for line in text.splitlines() if "Maximum resident set size" in line]
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()] \
        if (run_dir / "log.jsonl").exists() else []
    steps = [r for r in records if r["event"] == "step"]
    result = {"star": str(star), "workers": workers, "wall_seconds": wall, "stopped_by_sigterm": stopped,
              "trainer_hwm_mb": _mb(hwm if stopped else sampler.hwm.get(trainer_pid, 0)),
              "time_v_max_rss_mb": _mb(max_rss[0]) if max_rss else None,
              "worker_hwm_mb": [_mb(v) for p, v in sampler.hwm.items() if p != trainer_pid], **memory,
              "step_records": len(steps)}
    if len(steps) >= 2:
        first, last = steps[0], steps[-1]
        result.update(images_seen=last["images_seen"],
                      first_step_log_after_s=first["wall_time"] - (time.time() - wall),
                      images_per_s=(last["images_seen"] - first["images_seen"])
                      / (last["wall_time"] - first["wall_time"]))
        config = run_dir / "config.yaml"
        if config.exists():
            result["config_mtime_after_start_s"] = config.stat().st_mtime - (time.time() - wall)
    return result


# ---------------------------------------------------------------- all

def _sub(*args: str) -> dict:
    command = [sys.executable, __file__, *args]
    print("+", " ".join(command), file=sys.stderr, flush=True)
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"failed: {' '.join(command)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_all(folder: Path, n: int, seconds: float, train_seconds: float, cleanup: bool) -> dict:
    summary: dict = {"waited_for_cryodrgn_s": wait_for_cryodrgn()}
    big, small = folder / "particles.star", folder / "particles_10k.star"
    if not big.exists():
        summary["make"] = _sub("make", "--out", str(folder), "-n", str(n), "--box", "128")
    summary["table_1m"] = _sub("table", "--star", str(big))
    summary["table_10k"] = _sub("table", "--star", str(small))
    summary["memory"] = _sub("memory", "--star", str(big), "--images", "20000", "--seconds", "15")
    for workers in (0, 2, 4):
        summary[f"loader_1m_w{workers}_cold"] = _sub("loader", "--star", str(big), "--workers", str(workers),
                                                     "--seconds", str(seconds), "--cold")
    summary["loader_10k_w2_warm"] = _sub("loader", "--star", str(small), "--workers", "2", "--seconds", str(seconds))
    summary["train_1m"] = _sub("train", "--star", str(big), "--seconds", str(train_seconds),
                               "--run-dir", str(folder / "run_1m"))
    summary["train_10k"] = _sub("train", "--star", str(small), "--seconds", str(train_seconds),
                                "--run-dir", str(folder / "run_10k"))
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("-n", type=int, default=1_000_000)
    p.add_argument("--box", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset", type=int, default=10_000)
    p = sub.add_parser("table")
    p.add_argument("--star", type=Path, required=True)
    p = sub.add_parser("loader")
    p.add_argument("--star", type=Path, required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--cold", action="store_true")
    p = sub.add_parser("memory")
    p.add_argument("--star", type=Path, required=True)
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--seconds", type=float, default=20.0)
    p = sub.add_parser("train")
    p.add_argument("--star", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--workers", type=int, default=2)
    p = sub.add_parser("all")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("-n", type=int, default=1_000_000)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--train-seconds", type=float, default=180.0)
    p.add_argument("--cleanup", action="store_true", help="delete the stacks and the 1M star at the end")
    args = parser.parse_args()
    if args.command == "make":
        result = make(args.out, args.n, args.box, args.seed, args.subset)
    elif args.command == "table":
        result = table_rss(args.star)
    elif args.command == "loader":
        result = loader(args.star, args.workers, args.seconds, args.cold)
    elif args.command == "memory":
        result = in_memory(args.star, args.images, args.seconds)
    elif args.command == "train":
        result = train(args.star, args.seconds, args.run_dir, args.workers)
    else:
        result = run_all(args.dir, args.n, args.seconds, args.train_seconds, args.cleanup)
        if args.cleanup:
            import shutil
            shutil.rmtree(args.dir / "stacks")
            (args.dir / "particles.star").unlink()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
