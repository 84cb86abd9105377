"""Training and inference throughput (images/s), decoder TFLOP/s and peak memory, for bench/RESULTS.md (issue 5).

    python bench/throughput.py --quick                                     # smoke test, a few seconds
    python bench/throughput.py --device cpu --boxes 64 128 --batch-sizes 8 32 --steps 3 --out cpu.json
    python bench/throughput.py --gpu-sweep --out gpu.json                  # CUDA preset, < 4 min on an H100/H200

Default model (``ModelConfig`` defaults: symmetric loss, width 256, depth 3, 64 Fourier features, zdim 8) at the full
frequency radius D / 2 (the slowest phase of frequency marching), random images and CTF parameters (content does not
change the cost), built as bench/train_step_speed.py does (bench/bench_common.py). Kinds of measurement:

* ``train``: a full step as ``cryofire train`` runs it -- CTF images from the parameters, forward under bf16 autocast
  when asked, backward, Adam step -- in pose mode 'abinit' (encoder poses, image + mirror: 2 hypotheses per image)
  and 'fixed' (given poses: 1 hypothesis).
* ``decoder``: the hypervolume alone, forward + backward (no optimizer) on the same number of frequencies as the
  training step (batch x hypotheses x lattice points within D / 2), coordinates needing gradients in 'abinit'.
* ``encode``: encoder-only inference (``model.encode`` under ``torch.inference_mode``; 'abinit' encodes the image and
  its mirror).
* ``infer``: the forward without gradients, as ``cryofire infer`` (encoder, then the decoder picks the best pose).

Precision ``fp32`` follows ``cryofire train``: float32 weights and, on CUDA, TF32 matmuls (``--no-tf32`` turns them
off); ``bf16`` is bf16 autocast (the ``mixed_precision`` option of ``cryofire train``). ``--compile on`` wraps the
model (or the decoder, or ``model.encode``) in ``torch.compile``; its warm-up time (compilation included) is reported
separately. Times are medians over ``--steps`` timed steps after ``--warmup`` untimed ones, synchronised on CUDA.
Peak memory: ``torch.cuda.max_memory_allocated`` per case on CUDA; peak RSS (``getrusage``, reset per case through
/proc/self/clear_refs where Linux allows) on the CPU.

Decoder FLOPs are analytic (``bench_common.decoder_matmul_flops``): matmuls only, 2 FLOPs per multiply-add, per
decoded point: the Fourier-feature projection 3 -> 64, the coordinate layer 128 -> 256, 3 residual 256 -> 256 layers
and the output 256 -> 2 (0.46 MFLOP forward), a step ~3x forward (1.380 MFLOP per point in 'abinit', 1.314 in
'fixed', where the coordinates need no gradient). Points per image at the radius D / 2: 1,602 (D=64), 6,424 (128),
25,714 (256) half-plane lattice points, times 2 hypotheses in 'abinit': 4.4, 17.7, 71.0 GFLOP per image and training
step in 'abinit' (2.1, 8.4, 33.8 in 'fixed'). "decoder TFLOP/s in step" divides the decoder's
FLOPs by the whole training step's time (a lower bound on the decoder's rate inside training); the ``decoder`` kind
gives the decoder's own rate. The fraction of peak uses ``--peak-tflops`` or, for known GPUs, the dense tensor-core
peak of the precision (H100/H200 SXM: bf16 989.4, TF32 494.7 TFLOP/s; fp32 without TF32: 66.9).

On a shared, loaded CPU use ``--threads 1`` (two threads that wait for each other when one is descheduled ran up to
20x slower here) and compare the "CPU s/step" column (process user + system time) rather than wall times.

Every case runs in a try block: an error or an out-of-memory is recorded and the sweep goes on. The JSON file
(``--out``) is rewritten after every case, so a run killed by a time limit keeps what it measured (the tables go
beside it, as .md, at the end); ``--time-budget-s`` skips the cases that would start after that many seconds
(compiled cases: that would start with less than 60 s left).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    IMAGES_SEEN,
    build_model,
    decoded_points,
    decoder_matmul_flops,
    model_inputs,
    peak_memory_mb,
    reset_peak_memory,
    synthetic_batch,
    tflops,
    time_steps,
)

KINDS = ("train", "decoder", "encode", "infer")
COMPILE_RESERVE_S = 60.0  # a compiled case starts only with this much of --time-budget-s left

# Dense peak TFLOP/s (no sparsity) by device-name substring: {precision: peak}; "fp32" means TF32 tensor cores
# (what cryofire train enables), "fp32-no-tf32" the CUDA cores.
GPU_PEAKS = (
    ("H200", {"bf16": 989.4, "fp32": 494.7, "fp32-no-tf32": 66.9}),  # H200 SXM (same compute as H100 SXM)
    ("H100 PCIe", {"bf16": 756.0, "fp32": 378.0, "fp32-no-tf32": 51.2}),
    ("H100", {"bf16": 989.4, "fp32": 494.7, "fp32-no-tf32": 66.9}),   # H100 SXM
    ("A100", {"bf16": 312.0, "fp32": 156.0, "fp32-no-tf32": 19.5}),
)


def peak_tflops(device: torch.device, precision: str, tf32: bool, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = precision if precision == "bf16" or tf32 else "fp32-no-tf32"
    for pattern, peaks in GPU_PEAKS:
        if pattern in name:
            return peaks[key]
    return None


def hypotheses_per_image(model) -> int:
    config = model.config
    if config.pose_mode == "abinit":
        return config.num_pose_heads * (2 if config.symmetric_loss else 1)
    return 1


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def reset_cpu_peak_rss() -> bool:
    """Reset the peak RSS that getrusage reports (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


# --- one case --------------------------------------------------------------------------------------------------------
def run_case(case: dict, device: torch.device, args) -> dict:
    kind, box, batch, precision, compiled, mode = (
        case["kind"], case["box"], case["batch"], case["precision"], case["compile"], case["pose_mode"])
    torch.manual_seed(0)
    model = build_model(box, mode, device)
    data = synthetic_batch(batch, box, device)
    hypotheses = hypotheses_per_image(model)
    points = batch * decoded_points(box, hypotheses)
    result: dict = {"hypotheses_per_image": hypotheses, "decoded_points_per_step": points}

    if kind == "train":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        forward = torch.compile(model) if compiled else model

        def step() -> None:
            images, ctf, given = model_inputs(model, data)
            with autocast(device, precision):
                loss = forward(images, ctf, IMAGES_SEEN, **given)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    elif kind == "decoder":
        decoder = model.decoder
        n = points // (batch * hypotheses)
        coords = (torch.rand(batch, hypotheses, n, 3, device=device) - 0.5).requires_grad_(mode == "abinit")
        z = torch.randn(batch, hypotheses, model.config.zdim, device=device, requires_grad=True)
        forward = torch.compile(decoder) if compiled else decoder

        def step() -> None:
            with autocast(device, precision):
                values = forward(coords, z)
            decoder.zero_grad(set_to_none=True)
            values.float().square().mean().backward()

    elif kind in ("encode", "infer"):
        model.eval()
        if kind == "encode":
            forward = torch.compile(model.encode) if compiled else model.encode
        else:
            forward = torch.compile(model) if compiled else model

        def step() -> None:
            with torch.inference_mode(), autocast(device, precision):
                if kind == "encode":
                    given = {}
                    if mode != "abinit":
                        given = {"given_rotations": data["rotations"], "given_shifts_px": data["origins_px"]}
                    forward(data["images"], **given)
                else:
                    images, ctf, given = model_inputs(model, data)
                    forward(images, ctf, IMAGES_SEEN, **given)
    else:
        raise ValueError(kind)

    reset_peak_memory(device)
    rss_reset = device.type != "cuda" and reset_cpu_peak_rss()
    timing = time_steps(step, device, args.warmup, args.steps)
    result.update(timing)
    result["peak_memory_mb"] = round(peak_memory_mb(device), 1)
    if device.type != "cuda":
        result["peak_memory_kind"] = "peak RSS of this case" if rss_reset else "peak RSS of the process so far"
    else:
        result["peak_memory_kind"] = "torch.cuda.max_memory_allocated"
    result["images_per_s"] = batch / timing["median_s"]
    if kind in ("train", "decoder", "infer"):
        flops = decoder_matmul_flops(model, points, coords_need_grad=(mode == "abinit"))
        step_flops = flops["forward"] if kind == "infer" else flops["step"]
        result["decoder_flops_per_step"] = step_flops
        result["decoder_tflops"] = tflops(step_flops, timing["median_s"])
        peak = peak_tflops(device, precision, args.tf32, args.peak_tflops)
        result["peak_tflops"] = peak
        result["fraction_of_peak"] = result["decoder_tflops"] / peak if peak else None
    return result


def free_memory(device: torch.device, compiled: bool) -> None:
    gc.collect()
    if compiled:
        torch._dynamo.reset()  # drop the compiled graphs of this case's model
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the sweep -------------------------------------------------------------------------------------------------------
def build_cases(args) -> list[dict]:
    cases = []
    if args.gpu_sweep:
        big, compile_box = (128, 256), 128
        batches, precisions = (64, 128), ("fp32", "bf16")
        for box in big:
            for batch in batches:
                for precision in precisions:
                    for mode in ("abinit", "fixed"):
                        cases.append(dict(kind="train", box=box, batch=batch, precision=precision, compile=False,
                                          pose_mode=mode))
                    cases.append(dict(kind="decoder", box=box, batch=batch, precision=precision, compile=False,
                                      pose_mode="abinit"))
                    cases.append(dict(kind="encode", box=box, batch=batch, precision=precision, compile=False,
                                      pose_mode="abinit"))
        # Compiled cases last, most informative first (the time budget may stop the sweep among them): the decoder
        # alone (a small graph, quick to compile), then the training step.
        for precision in ("bf16", "fp32"):
            cases.append(dict(kind="decoder", box=compile_box, batch=128, precision=precision, compile=True,
                              pose_mode="abinit"))
        for mode in ("abinit", "fixed"):
            for batch in (128, 64):
                for precision in ("bf16", "fp32"):
                    cases.append(dict(kind="train", box=compile_box, batch=batch, precision=precision, compile=True,
                                      pose_mode=mode))
        return cases
    for compiled in args.compile:
        for box in args.boxes:
            for batch in args.batch_sizes:
                for precision in args.precisions:
                    for kind in args.kinds:
                        modes = args.pose_modes if kind in ("train", "infer", "encode") else ["abinit"]
                        for mode in modes:
                            cases.append(dict(kind=kind, box=box, batch=batch, precision=precision,
                                              compile=compiled == "on", pose_mode=mode))
    return cases


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(results: list[dict]) -> str:
    lines = []
    sections = {
        "train": ("Training step (forward + backward + Adam)",
                  "| D | pose mode | batch | precision | compile | images/s | step ms | CPU s/step | warm-up s | "
                  "peak mem MB | decoder TFLOP/s in step | % of peak |"),
        "decoder": ("Decoder alone, forward + backward on the training step's points",
                    "| D | batch | points/step | precision | compile | ms | CPU s/step | TFLOP/s | % of peak | "
                    "peak mem MB |"),
        "encode": ("Encoder-only inference",
                   "| D | pose mode | batch | precision | compile | images/s | ms | peak mem MB |"),
        "infer": ("Inference forward (encoder + decoder best-pose pick, no gradients)",
                  "| D | pose mode | batch | precision | compile | images/s | ms | decoder TFLOP/s | peak mem MB |"),
    }
    for kind, (title, header) in sections.items():
        rows = [r for r in results if r["kind"] == kind]
        if not rows:
            continue
        lines += ["", f"### {title}", "", header, "|" + "---|" * (header.count("|") - 1)]
        for r in rows:
            head = f"| {r['box']} |"
            if kind != "decoder":
                head += f" {r['pose_mode']} |"
            head += f" {r['batch']} |"
            if kind == "decoder":
                head += f" {r.get('decoded_points_per_step', '-'):,} |" if "decoded_points_per_step" in r else " - |"
            head += f" {r['precision']} | {'on' if r['compile'] else 'off'} |"
            if r.get("status") != "ok":
                cells = header.count("|") - 1 - head.count("|") + 1
                lines.append(head + f" {r.get('status')} |" + " |" * (cells - 1))
                continue
            ms = 1e3 * r["median_s"]
            pct = None if r.get("fraction_of_peak") is None else 100 * r["fraction_of_peak"]
            if kind == "train":
                lines.append(head + f" {r['images_per_s']:.1f} | {ms:.1f} | {r['cpu_median_s']:.2f} | "
                             f"{r['warmup_s']:.1f} | "
                             f"{r['peak_memory_mb']:.0f} | {fmt(r['decoder_tflops'], '.3g')} | {fmt(pct)} |")
            elif kind == "decoder":
                lines.append(head + f" {ms:.1f} | {r['cpu_median_s']:.2f} | {fmt(r['decoder_tflops'], '.3g')} | "
                             f"{fmt(pct)} | "
                             f"{r['peak_memory_mb']:.0f} |")
            elif kind == "encode":
                lines.append(head + f" {r['images_per_s']:.1f} | {ms:.1f} | {r['peak_memory_mb']:.0f} |")
            else:
                lines.append(head + f" {r['images_per_s']:.1f} | {ms:.1f} | {fmt(r['decoder_tflops'], '.3g')} | "
                             f"{r['peak_memory_mb']:.0f} |")
    return "\n".join(lines)


def environment(device: torch.device, args) -> dict:
    meta = {
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "tf32": args.tf32,
        "steps": args.steps, "warmup": args.warmup, "command": " ".join(sys.argv),
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "decoder_flops_note": "matmul FLOPs only (2 per multiply-add) at the full radius D/2; a step = forward + "
                              "weight gradients + input gradients (~3x forward)",
    }
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
        meta["cuda"] = torch.version.cuda
    else:
        meta["cpu"] = platform.processor() or platform.machine()
        try:
            meta["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                               if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1")
    parser.add_argument("--boxes", type=int, nargs="+", default=None, help="box sizes D (default 64 128; GPU 128 256)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 8 32 (CPU), 64 128 (GPU)")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=None,
                        help="default fp32 on the CPU, fp32 bf16 on CUDA")
    parser.add_argument("--compile", nargs="+", choices=("off", "on"), default=["off"])
    parser.add_argument("--pose-modes", nargs="+", choices=("abinit", "fixed"), default=["abinit", "fixed"])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=["train", "decoder", "encode"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on CUDA, 3 on the CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on CUDA, 1 on CPU)")
    parser.add_argument("--quick", action="store_true", help="smoke test: D=32 batch 4, 2 steps")
    parser.add_argument("--gpu-sweep", action="store_true",
                        help="preset for one CUDA device in < 4 min: D=128, 256; batch 64, 128; fp32, bf16; train "
                             "(abinit, fixed), decoder alone, encoder inference; compile on/off at D=128")
    parser.add_argument("--no-tf32", dest="tf32", action="store_false", help="fp32 matmuls without TF32 on CUDA")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="start no case after this many seconds (default 180 with --gpu-sweep)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak for the '%% of peak' column")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is steadier on a shared, loaded CPU")
    parser.add_argument("--out", default=None, help="JSON file, rewritten after every case")
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    if args.gpu_sweep and not cuda:
        parser.error("--gpu-sweep needs a CUDA device")
    if args.quick:
        args.boxes, args.batch_sizes = args.boxes or [32], args.batch_sizes or [4]
        args.steps, args.warmup = args.steps or 2, args.warmup or 1
    args.boxes = args.boxes or ([128, 256] if cuda else [64, 128])
    args.batch_sizes = args.batch_sizes or ([64, 128] if cuda else [8, 32])
    args.precisions = args.precisions or (["fp32", "bf16"] if cuda else ["fp32"])
    args.steps = args.steps or (10 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if "on" in args.compile:
        args.warmup = max(args.warmup, 2)  # the first forward and the first backward compile
    if args.gpu_sweep and args.time_budget_s is None:
        args.time_budget_s = 180.0
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32  # as cryofire train
    try:  # every compiled case is a new model: room for its recompilations (the name changed across versions)
        dynamo_config = importlib.import_module("torch._dynamo").config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    except (ImportError, AttributeError):
        pass

    meta = environment(device, args)
    print(f"# throughput: torch {meta['torch']}, {meta.get('gpu', meta.get('cpu'))}, {meta['threads']} threads, "
          f"load average {meta['load_average_start']}", flush=True)
    cases = build_cases(args)
    results: list[dict] = []
    started = time.perf_counter()

    def save() -> None:
        if args.out:
            meta["elapsed_s"] = time.perf_counter() - started
            meta["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
            Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")

    for index, case in enumerate(cases, 1):
        row = dict(case)
        elapsed = time.perf_counter() - started
        reserve = COMPILE_RESERVE_S if case["compile"] else 0.0
        if args.time_budget_s is not None and elapsed + reserve > args.time_budget_s:
            row["status"] = "skipped (time budget)"
        else:
            case_started = time.perf_counter()
            try:
                row.update(run_case(case, device, args))
                row["status"] = "ok"
            except torch.OutOfMemoryError:
                row["status"] = "OOM"
            except Exception as error:  # noqa: BLE001 -- record and go on
                row["status"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
                traceback.print_exc(limit=3)
            row["case_wall_s"] = time.perf_counter() - case_started
            free_memory(device, case["compile"])
        results.append(row)
        label = (f"[{index}/{len(cases)} {time.perf_counter() - started:6.1f}s] {row['kind']:<7} D={row['box']} "
                 f"B={row['batch']} {row['pose_mode']:<6} {row['precision']} "
                 f"compile={'on' if row['compile'] else 'off'}")
        if row["status"] == "ok":
            extra = f"{row['images_per_s']:9.1f} img/s {1e3 * row['median_s']:8.1f} ms"
            if row.get("decoder_tflops") is not None:
                extra += f" decoder {row['decoder_tflops']:.3g} TFLOP/s"
            extra += f" peak {row['peak_memory_mb']:.0f} MB"
        else:
            extra = row["status"]
        print(f"{label}: {extra}", flush=True)
        save()
    table = markdown(results) + (
        f"\n\n{len(results)} cases in {time.perf_counter() - started:.0f} s; decoder FLOPs: matmuls only at the full "
        f"radius D/2, a training step ~3x forward; peak: --peak-tflops or the dense tensor-core figure of the GPU.")
    print(table)
    save()
    if args.out:
        Path(args.out).with_suffix(".md").write_text(f"{meta['command']}\n{table}\n")


if __name__ == "__main__":
    main()
