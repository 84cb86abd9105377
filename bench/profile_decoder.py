"""Where a training step's time goes (torch.profiler), default model at the full frequency radius.

    python bench/profile_decoder.py --box 64 --batch 8 --steps 2 --threads 1     # CPU, a short run
    python bench/profile_decoder.py --device cuda --box 128 --batch 64 --precision bf16

Prints the ops by self time (top ``--top``), the share of the forward time spent in the encoder and in the decoder
(``record_function`` ranges opened by module hooks; backward ops are listed by name, e.g. ``MmBackward0``), and, with
``--trace FILE``, writes a Chrome trace. Synthetic images and CTFs as in bench/throughput.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import IMAGES_SEEN, build_model, model_inputs, synthetic_batch  # noqa: E402


def label_modules(model: torch.nn.Module) -> None:
    """Open a profiler range named after each top-level sub-module around its forward."""
    for name in ("encoder", "decoder"):
        module = getattr(model, name)
        ranges = []

        def pre(_module, _args, name=name, ranges=ranges):
            ranges.append(record_function(f"## {name}.forward"))
            ranges[-1].__enter__()

        def post(_module, _args, _output, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pose-mode", default="abinit", choices=("abinit", "fixed"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast, as in training")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1: steadier on a shared CPU)")
    parser.add_argument("--trace", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.box, args.pose_mode, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = synthetic_batch(args.batch, args.box, device)
    label_modules(model)

    def step() -> None:
        with record_function("## step.forward"):
            images, ctf, given = model_inputs(model, batch)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                loss = model(images, ctf, IMAGES_SEEN, **given)["loss"]
        with record_function("## step.backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with record_function("## step.optimizer"):
            optimizer.step()

    step()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, D={args.box}, batch {args.batch}, "
          f"{args.pose_mode}, {args.precision}, {args.steps} profiled steps")
    events = prof.key_averages()
    print(events.table(sort_by=sort, row_limit=args.top))
    ranges = {e.key: e for e in events if e.key.startswith("## ")}
    total = sum(ranges[k].cpu_time_total for k in ranges if k.startswith("## step."))
    print("ranges (CPU wall time inclusive, share of the step):")
    for key in sorted(ranges, key=lambda k: -ranges[k].cpu_time_total):
        e = ranges[key]
        print(f"  {key[3:]:<18} {e.cpu_time_total / 1e3 / args.steps:9.1f} ms/step  {e.cpu_time_total / total:6.1%}")
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
