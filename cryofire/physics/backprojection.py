"""Direct Fourier reconstruction: trilinear insertion of image spectra, Wiener-like division.

Each image spectrum (B, D, D) is inserted at its central slice (see
:mod:`cryofire.physics.projection`): ``sum CTF * F`` accumulates into a complex volume sum and
``sum CTF^2`` into a real weight sum, both spread over the 8 nearest voxels with trilinear
weights. The volume is ``IFT(volume_sum / (weight_sum + wiener_constant))`` divided by the
trilinear gridding kernel. :class:`Backprojector` does this on a 2x zero-padded grid, which
removes most interpolation error.
"""

from __future__ import annotations

import itertools

import torch

from cryofire.physics.fft import fft2_centered, ifft3_centered
from cryofire.physics.lattice import crop_centered, pad_centered
from cryofire.physics.projection import slice_coordinates_px, trilinear_gridding_kernel


def _scatter_trilinear(
    coords_px: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    volume_sum: torch.Tensor,
    weight_sum: torch.Tensor,
) -> None:
    """Add ``values`` (M, 2) (re, im) and ``weights`` (M,) at lattice offsets ``coords_px``
    (M, 3) (x, y, z) into flat views of the sums, trilinearly; points off the grid add nothing."""
    size = volume_sum.shape[-1]
    index = coords_px + size // 2
    base = torch.floor(index)
    frac = index - base
    base = base.long()
    volume_flat = torch.view_as_real(volume_sum).view(-1, 2)
    weight_flat = weight_sum.view(-1)
    for corner in itertools.product((0, 1), repeat=3):
        offset = torch.tensor(corner, device=base.device)
        corner_index = base + offset
        corner_weight = torch.where(offset.bool(), frac, 1 - frac).prod(-1)
        inside = ((corner_index >= 0) & (corner_index < size)).all(-1)
        corner_weight = torch.where(inside, corner_weight, torch.zeros_like(corner_weight))
        x, y, z = corner_index.clamp(0, size - 1).unbind(-1)
        flat = (z * size + y) * size + x
        volume_flat.index_put_((flat,), values * corner_weight[:, None], accumulate=True)
        weight_flat.index_put_((flat,), weights * corner_weight, accumulate=True)


def backproject_ft(
    images_ft: torch.Tensor,
    rotations: torch.Tensor,
    ctf: torch.Tensor | None,
    volume_sum: torch.Tensor,
    weight_sum: torch.Tensor,
) -> None:
    """Insert centred spectra (B, D, D) at poses (B, 3, 3) into the sums, in place.

    Args:
        images_ft: (B, D, D) complex centred spectra of the images.
        rotations: (B, 3, 3) RELION pose matrices.
        ctf: (B, D, D) CTF of each image, or None for CTF = 1.
        volume_sum: (D, D, D) complex accumulator of ``CTF * F`` (contiguous).
        weight_sum: (D, D, D) real accumulator of ``CTF^2`` (contiguous).
    """
    real_dtype = weight_sum.dtype
    coords = slice_coordinates_px(images_ft.shape[-1], rotations.to(real_dtype)).reshape(-1, 3)
    if ctf is None:
        ctf = torch.ones(images_ft.shape, dtype=real_dtype, device=images_ft.device)
    ctf = ctf.to(real_dtype)
    values = torch.view_as_real((ctf * images_ft).to(volume_sum.dtype)).reshape(-1, 2)
    _scatter_trilinear(coords, values, (ctf * ctf).reshape(-1), volume_sum, weight_sum)


def reconstruct_from_sums(
    volume_sum: torch.Tensor, weight_sum: torch.Tensor, wiener_constant: float = 1.0
) -> torch.Tensor:
    """Real volume (D, D, D) from the sums of :func:`backproject_ft`.

    ``wiener_constant`` is added to the weights before dividing (a 1/SNR-like regulariser, in
    units of one image's CTF^2 weight); voxels with zero total weight give zero.
    """
    denominator = weight_sum + wiener_constant
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    volume_ft = torch.where(denominator > 0, volume_sum / safe, torch.zeros_like(volume_sum))
    volume = ifft3_centered(volume_ft).real
    size = volume.shape[-1]
    return volume / trilinear_gridding_kernel(size, volume.device, volume.dtype)


class Backprojector:
    """Accumulates images into an ``oversampling``-times padded Fourier volume.

    ``insert`` takes real images (B, D, D); any CTF must be given on the padded lattice,
    ``ctf_for_images(backprojector.padded_size, pixel_size_angstrom, ...)`` (padding keeps the
    pixel size). ``reconstruct`` returns the (D, D, D) volume.
    """

    def __init__(
        self,
        size: int,
        oversampling: int = 2,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.size = size
        self.padded_size = oversampling * size
        shape = (self.padded_size,) * 3
        self.volume_sum = torch.zeros(shape, dtype=dtype.to_complex(), device=device)
        self.weight_sum = torch.zeros(shape, dtype=dtype, device=device)

    def insert(
        self, images: torch.Tensor, rotations: torch.Tensor, ctf: torch.Tensor | None = None
    ) -> None:
        """Add real images (B, D, D) with poses (B, 3, 3) and optional CTF (B, P, P)."""
        if ctf is not None and ctf.shape[-1] != self.padded_size:
            raise ValueError(
                f"ctf must be on the padded {self.padded_size}-pixel lattice, "
                f"got shape {tuple(ctf.shape)}"
            )
        padded = pad_centered(images.to(self.weight_sum.dtype), self.padded_size, ndim=2)
        backproject_ft(fft2_centered(padded), rotations, ctf, self.volume_sum, self.weight_sum)

    def reconstruct(self, wiener_constant: float = 1.0) -> torch.Tensor:
        """The reconstructed real volume (D, D, D); see :func:`reconstruct_from_sums`."""
        volume = reconstruct_from_sums(self.volume_sum, self.weight_sum, wiener_constant)
        return crop_centered(volume, self.size, ndim=3)
