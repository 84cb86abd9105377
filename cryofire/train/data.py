"""Training data: particle images with their CTF parameters and (when known) poses, a batch at a time.

Images are read lazily through :class:`cryofire.io.ImageSource`, one whole batch per read (the dataset implements
``__getitems__``), so memory stays bounded whatever the dataset size and DataLoader workers can prefetch.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from cryofire import physics
from cryofire.io import ImageSource
from cryofire.physics import ctf_from_parameters as ctf_from_parameters  # CTF images of a batch's parameter rows

CTF_PARAMETER_COLUMNS = (
    "rlnImagePixelSize", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
    "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnPhaseShift", "rlnCtfBfactor",
)
ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
ORIGIN_COLUMNS = ("rlnOriginXAngst", "rlnOriginYAngst")


def has_poses(table: pd.DataFrame) -> bool:
    return all(c in table.columns for c in (*ANGLE_COLUMNS, *ORIGIN_COLUMNS))


def table_poses(table: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
    """RELION poses of a table: matrices (N, 3, 3) and origins in pixels (N, 2), float32."""
    angles = [torch.tensor(table[c].to_numpy(np.float64)) for c in ANGLE_COLUMNS]
    rotations = physics.euler_to_matrix(*angles).float()
    origins = table[list(ORIGIN_COLUMNS)].to_numpy(np.float64) / table["rlnImagePixelSize"].to_numpy()[:, None]
    return rotations, torch.from_numpy(origins).float()


class ParticleImages(torch.utils.data.Dataset):
    """Batches of {"index", "images" (B, D, D), "ctf_parameters" (B, 9)[, "rotations", "origins_px"]}.

    Args:
        table: the particle table (docs/conventions.md).
        rows: which table rows this dataset serves (e.g. the training or validation split); default all.
    """

    def __init__(self, table: pd.DataFrame, rows: np.ndarray | None = None) -> None:
        self.table = table
        self.rows = np.arange(len(table)) if rows is None else np.asarray(rows)
        self.source = ImageSource(table)
        self.image_size = self.source.image_size
        self.ctf_parameters = torch.from_numpy(table[list(CTF_PARAMETER_COLUMNS)].to_numpy(np.float32))
        self.poses = table_poses(table) if has_poses(table) else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        rows = self.rows[np.asarray(positions)]
        batch = {
            "index": torch.from_numpy(rows),
            "images": torch.from_numpy(self.source[rows]),
            "ctf_parameters": self.ctf_parameters[rows],
        }
        if self.poses is not None:
            batch["rotations"], batch["origins_px"] = self.poses[0][rows], self.poses[1][rows]
        return batch

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([position]).items()}


def keep_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DataLoader collate function for datasets that already return whole batches."""
    return batch


class ShardedBatches(torch.utils.data.Sampler[list[int]]):
    """One process's batches of a multi-process step: the epoch's order cut into global batches of
    ``batch_size x world_size`` positions (a last, shorter one dropped), of which process `rank` takes slice `rank`.

    Concatenated over the ranks, step k is exactly batch k of one process with batch size ``batch_size x world_size``
    and the same order; every process gets the same number of batches.
    """

    def __init__(self, order: torch.utils.data.Sampler[int], batch_size: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.order, self.batch_size, self.rank, self.world_size = order, batch_size, rank, world_size

    def __iter__(self):
        order = list(self.order)
        step = self.batch_size * self.world_size
        for start in range(0, len(order) - step + 1, step):
            first = start + self.rank * self.batch_size
            yield order[first:first + self.batch_size]

    def __len__(self) -> int:
        return len(self.order) // (self.batch_size * self.world_size)


def make_loader(
    dataset: ParticleImages, batch_size: int, shuffle: bool, seed: int, epoch: int, num_workers: int,
    pin_memory: bool, rank: int = 0, world_size: int = 1,
) -> torch.utils.data.DataLoader:
    """A DataLoader whose shuffling depends only on (seed, epoch), so a resumed run sees the same batches.

    With `world_size` > 1 (data-parallel training, shuffled loaders only) process `rank` gets its `batch_size`
    share of each global batch of the same seeded order (:class:`ShardedBatches`). The workers' base seed comes from
    a generator of its own, not from the global random state, so making a loader (e.g. rebuilding the teacher's maps
    after a resume) leaves the training's random stream where it was.
    """
    epoch_seed = seed * 100_003 + epoch
    worker_seed = torch.Generator().manual_seed(epoch_seed)
    sampler = (torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(epoch_seed))
               if shuffle else None)
    if world_size > 1:
        if not shuffle:
            raise ValueError("only shuffled (training) loaders are split over processes")
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=ShardedBatches(sampler, batch_size, rank, world_size), collate_fn=keep_batch,
            num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False, generator=worker_seed,
        )
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=shuffle, collate_fn=keep_batch,
        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False, generator=worker_seed,
    )
