"""Writing a large image set as a series of `.mrcs` stacks, chunk by chunk, resumable after a kill.

Images are produced by a callback, a chunk of indices at a time, so memory stays at one chunk. Each stack is
written to a temporary name and renamed when complete, and a manifest records which stacks are done and with
which settings (the *fingerprint*); a re-run with the same fingerprint skips the stacks already written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cryofire.diskspace import require_free_space
from cryofire.io import StackWriter

MANIFEST_NAME = "stacks.json"


def _atomic_write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def _load_manifest(path: Path, fingerprint: dict) -> dict:
    if path.exists():
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):  # damaged: write every stack again
            manifest = {}
        if manifest.get("fingerprint") == fingerprint:
            return manifest
    return {"fingerprint": fingerprint, "done": []}


def stack_layout(n_images: int, images_per_stack: int) -> list[tuple[int, int]]:
    """(start, stop) image ranges of each stack."""
    return [(start, min(start + images_per_stack, n_images)) for start in range(0, n_images, images_per_stack)]


def _stack_path(out_dir: Path, prefix: str, number: int) -> Path:
    return out_dir / f"{prefix}_{number:04d}.mrcs"


def _is_done(path: Path, manifest: dict) -> bool:
    """Whether an earlier run with the same fingerprint completed the stack at ``path``."""
    return path.name in manifest["done"] and path.exists()


def write_stacks(
    out_dir: str | Path,
    prefix: str,
    n_images: int,
    image_size: int,
    pixel_size_angstrom: float,
    make_images: Callable[[np.ndarray], np.ndarray],
    fingerprint: dict,
    images_per_stack: int = 10_000,
    chunk_size: int = 1_000,
    description: str = "writing images",
) -> tuple[np.ndarray, np.ndarray]:
    """Write `n_images` images to `out_dir/<prefix>_NNNN.mrcs` stacks.

    Args:
        make_images: called with a sorted array of image indices, returns float32 (n, D, D) images.
        fingerprint: JSON-able settings; stacks left by an earlier run are reused only if it is equal.

    Returns:
        (stack path per image (str array), 0-based index within its stack per image).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Compare as stored: JSON turns tuples into lists, so an unnormalised fingerprint would never match.
    fingerprint = json.loads(json.dumps(fingerprint))
    manifest_path = out_dir / f"{prefix}_{MANIFEST_NAME}"
    manifest = _load_manifest(manifest_path, fingerprint)
    paths = np.empty(n_images, dtype=object)
    within = np.empty(n_images, dtype=np.int64)
    layout = stack_layout(n_images, images_per_stack)
    to_write = [stop - start for number, (start, stop) in enumerate(layout)
                if not _is_done(_stack_path(out_dir, prefix, number), manifest)]
    require_free_space(out_dir, sum(StackWriter.file_bytes(count, image_size) for count in to_write),
                       f"{len(to_write)} image stack(s) holding {sum(to_write)} images of {image_size}x{image_size} px")
    with tqdm(total=n_images, desc=description, unit="img", mininterval=2.0) as progress:
        for number, (start, stop) in enumerate(layout):
            path = _stack_path(out_dir, prefix, number)
            paths[start:stop] = str(path)
            within[start:stop] = np.arange(stop - start)
            if _is_done(path, manifest):
                progress.update(stop - start)
                continue
            with StackWriter(path, image_size, pixel_size_angstrom) as writer:
                for chunk_start in range(start, stop, chunk_size):
                    indices = np.arange(chunk_start, min(chunk_start + chunk_size, stop))
                    writer.write(np.asarray(make_images(indices), dtype=np.float32))
                    progress.update(len(indices))
            manifest["done"].append(path.name)
            _atomic_write_json(manifest_path, manifest)
    return paths, within
