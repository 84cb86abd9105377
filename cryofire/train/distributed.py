"""Data-parallel training over several processes (torch.distributed), as launched by torchrun.

``torchrun --standalone --nproc_per_node N -m cryofire.cli train ...`` starts N copies of `cryofire train` and gives
each WORLD_SIZE, RANK and LOCAL_RANK in its environment. Each process then trains on a disjoint part of every step's
images (see :func:`cryofire.train.data.make_loader`) and DistributedDataParallel averages the gradients, so N
processes with `batch_size` B take the same steps as one process with batch N x B, up to the order of float sums.
On CUDA process r uses cuda:LOCAL_RANK and NCCL; on the CPU, gloo. A plain `cryofire train` (or torchrun with one
process) runs exactly as without this module: no process group, no wrapper.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping

import numpy as np
import torch

from cryofire.device import resolve_device
from cryofire.errors import ConfigError

# Collective operations wait this long for the slowest process (rank 0 evaluates and writes while the others wait).
TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a torchrun launch (a single process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the log, checkpoints and outputs and shows the progress bar."""
        return self.rank == 0


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch:
    """The launch described by torchrun's WORLD_SIZE, RANK and LOCAL_RANK (absent: a single process)."""
    environ = os.environ if environ is None else environ
    try:
        world_size = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError as error:
        raise ConfigError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers ({error})") from error
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ConfigError(f"inconsistent launch: WORLD_SIZE={world_size} RANK={rank} LOCAL_RANK={local_rank}")
    return Launch(rank, local_rank, world_size)


def setup(device_name: str, launch: Launch) -> torch.device:
    """This process's device; in a multi-process launch also joins the process group (NCCL on CUDA, else gloo).

    Under torchrun `auto` and `cuda` mean cuda:LOCAL_RANK; a numbered device (`cuda:1`) is refused, since every
    process would pick the same one.
    """
    device = resolve_device(device_name)
    if not launch.distributed:
        return device
    if not torch.distributed.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed: run `cryofire train` without torchrun")
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(f"--device {device_name}: under torchrun each process uses cuda:LOCAL_RANK; "
                              "give --device cuda or auto")
        if launch.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"process {launch.rank} has LOCAL_RANK {launch.local_rank} but only "
                              f"{torch.cuda.device_count()} CUDA device(s) are visible: lower --nproc_per_node")
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"--device {device_name}: multi-process training runs on CUDA or the CPU")
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, timeout=TIMEOUT)
    if torch.distributed.get_world_size() != launch.world_size:
        raise ConfigError(f"the process group has {torch.distributed.get_world_size()} processes, "
                          f"WORLD_SIZE says {launch.world_size}")
    return device


def shutdown(launch: Launch) -> None:
    """Leave the process group (multi-process launches only)."""
    if launch.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wait_for_all(launch: Launch) -> None:
    """Barrier: return once every process has called it (multi-process launches only)."""
    if not launch.distributed:
        return
    if torch.distributed.get_backend() == "nccl":
        torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
    else:
        torch.distributed.barrier()


def process_seed(seed: int, rank: int) -> int:
    """Seed of the random draws of process `rank` > 0 (rank 0 keeps `seed`, as a single process does)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def mean_over_processes(value: torch.Tensor, launch: Launch) -> torch.Tensor:
    """The mean of a tensor over all processes (every process gets it); the tensor itself when single."""
    if not launch.distributed:
        return value
    total = value.detach().clone()
    torch.distributed.all_reduce(total)
    return total / launch.world_size


def gather_objects(value: Any, launch: Launch) -> list[Any]:
    """[value of rank 0, value of rank 1, ...] on every process (picklable values)."""
    if not launch.distributed:
        return [value]
    values: list[Any] = [None] * launch.world_size
    torch.distributed.all_gather_object(values, value)
    return values


def broadcast_object(value: Any, launch: Launch) -> Any:
    """Rank 0's `value` on every process (picklable values)."""
    if not launch.distributed:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
