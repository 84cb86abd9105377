"""Shared pieces of the speed benchmarks (throughput.py, profile_decoder.py): the default model at the full
frequency radius, a synthetic batch (random images and CTF parameters), timing and peak-memory helpers, and the
decoder's analytic matmul FLOPs.

The model is built as in bench/train_step_speed.py: ``planned_images`` 1e9 with no marching and no pose-only phase,
so a step at ``IMAGES_SEEN`` fits the full radius D / 2 (the slowest phase of training) with encoder latents.
"""

from __future__ import annotations

import math
import resource
import statistics
import sys
import time
from collections.abc import Callable

from pathlib import Path

import torch

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository, for a checkout without an install
from cryofire import physics  # noqa: E402
from cryofire.model import CryoFireModel, HalfPlaneLattice, ModelConfig  # noqa: E402

IMAGES_SEEN = 10**9


def build_model(box: int, pose_mode: str, device: torch.device | str = "cpu", **overrides) -> CryoFireModel:
    """The default model (``ModelConfig`` defaults, ``overrides`` on top) at the full frequency radius."""
    config = ModelConfig(box_size=box, pose_mode=pose_mode, planned_images=IMAGES_SEEN, pose_only_fraction=0.0,
                         marching_fraction=0.0, **overrides)
    return CryoFireModel(config).to(device)


def synthetic_batch(batch: int, box: int, device: torch.device | str = "cpu", seed: int = 0) -> dict:
    """Random images (B, D, D) and CTF parameters (B, 9) in ``CTF_PARAMETER_COLUMNS`` order (1.5 A/px, defocus
    1-2.5 um, 300 kV); random rotations and shifts for the 'fixed' mode. Content does not change the throughput."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(batch, 3, generator=g)
    ctf_parameters = torch.stack([
        torch.full((batch,), 1.5), 10000 + 15000 * u[:, 0], 10000 + 15000 * u[:, 1], 180 * u[:, 2],
        torch.full((batch,), 300.0), torch.full((batch,), 2.7), torch.full((batch,), 0.1),
        torch.zeros(batch), torch.zeros(batch),
    ], dim=1)
    q = torch.randn(batch, 4, generator=g)
    rotations = _quaternion_to_matrix(q / q.norm(dim=1, keepdim=True))
    return {
        "images": torch.randn(batch, box, box, generator=g).to(device),
        "ctf_parameters": ctf_parameters.to(device),
        "rotations": rotations.to(device),
        "origins_px": (2 * torch.randn(batch, 2, generator=g)).to(device),
    }


def _quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(*q.shape[:-1], 3, 3)


def model_inputs(model: CryoFireModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(images, ctf, given-pose kwargs) as ``cryofire.train.loop.training_step`` builds them (CTF from parameters
    on the device, every step)."""
    images = batch["images"]
    ctf = physics.ctf_from_parameters(batch["ctf_parameters"], images.shape[-1])
    given = {}
    if model.config.pose_mode != "abinit":
        given = {"given_rotations": batch["rotations"], "given_shifts_px": batch["origins_px"]}
    return images, ctf, given


# --- timing ----------------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], device: torch.device, warmup: int, steps: int) -> dict:
    """Run ``step`` ``warmup`` times untimed (their total, compilation included, is ``warmup_s``), then ``steps``
    times: per-step wall seconds (synchronised on CUDA), median and min, and the median process CPU time per step
    (user + system, all threads: on a shared CPU the wall time also counts the time other jobs held the cores)."""
    synchronize(device)
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - started
    times, cpu_times = [], []
    for _ in range(steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        step()
        synchronize(device)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    return {"median_s": statistics.median(times), "min_s": min(times), "warmup_s": warmup_s, "steps": steps,
            "cpu_median_s": statistics.median(cpu_times)}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: ``max_memory_allocated`` since the last reset. CPU: the process's peak RSS so far (monotonic over the
    whole run, so a configuration's figure includes every earlier one: run one configuration per process for
    exact CPU figures)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


# --- FLOPs -----------------------------------------------------------------------------------------------------------
def decoded_points(box: int, hypotheses: int) -> int:
    """Frequencies the decoder evaluates per image at the full radius D / 2: the half-plane lattice points within
    D / 2 px (``HalfPlaneLattice``, about pi D^2 / 8) times the pose hypotheses per image."""
    lattice = HalfPlaneLattice(box)
    return lattice.count_within(box / 2) * hypotheses


def decoder_matmul_flops(model: CryoFireModel, points: int, coords_need_grad: bool) -> dict:
    """Analytic matmul FLOPs (2 per multiply-add) of the hypervolume on ``points`` frequencies, for one forward and
    one training step (forward + backward).

    Forward per point: the Fourier-feature projection (3 -> F), the coordinate layer (2F -> W), ``depth`` residual
    layers (W -> W) and the output layer (W -> 2). Backward: a weight-gradient matmul and an input-gradient matmul
    per layer (2x forward), except the projection (frozen features: input gradient only) and the input gradient of
    the coordinate layer and projection when the coordinates need none ('fixed' poses). So a step is ~3x forward.
    The latent layer runs once per (image, hypothesis), not per point: negligible and not counted.
    """
    c = model.decoder.config
    features, width = 2 * c.num_features, c.width
    projection = 2 * 3 * c.num_features
    layers = [(features, width)] + [(width, width)] * c.depth + [(width, 2)]
    forward = projection + sum(2 * i * o for i, o in layers)
    weight_grad = sum(2 * i * o for i, o in layers)
    input_grad = sum(2 * i * o for i, o in layers[1:])
    if coords_need_grad:
        input_grad += 2 * features * width + projection
    per_point_step = forward + weight_grad + input_grad
    return {"forward_per_point": forward, "step_per_point": per_point_step,
            "forward": forward * points, "step": per_point_step * points}


def tflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12 if seconds > 0 else math.nan
