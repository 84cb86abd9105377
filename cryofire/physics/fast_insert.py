"""A fast CPU path for :class:`Backprojector` insertion: same sums, several times faster.

The trilinear insertion of :mod:`cryofire.physics.backprojection`, organised for speed (see the class).
"""

from __future__ import annotations

import torch

from cryofire.physics.backprojection import Backprojector
from cryofire.physics.ctf import compute_ctf
from cryofire.physics.fft import fft2_centered
from cryofire.physics.lattice import pad_centered


class FastInserter:
    """Inserts images into a :class:`Backprojector` several times faster on CPU than its ``insert``, with
    the same sums to float rounding; :meth:`flush` adds what was inserted into the backprojector's sums.

    The same trilinear insertion of ``CTF * F`` and ``CTF^2`` (:mod:`cryofire.physics.backprojection`), organised
    for speed:

    - Friedel symmetry: the images are real and the CTF is point-symmetric (``CTF(-k) = CTF(k)``), so the sample
      at ``-k`` is the complex conjugate of the one at ``k`` and lands on the mirrored voxels with the same
      trilinear weights. Only the half plane ``kx > 0`` (and ``kx = 0, ky >= 0``, DC at half weight) is inserted,
      into an accumulator that :meth:`flush` adds to its own conjugate mirror image. The first row and column of
      the even padded grid (``k = -P/2``, whose partners are off the grid) are inserted directly.
    - The 8 corners of a sample are constant offsets from one flat index into an accumulator padded to voxel
      indices -1 .. P + 1 (P + 1 being the mirror of -1), so no per-corner bounds test, clamp or mask is needed.
    - Trilinear weights are products of per-axis factors, and each channel (re, im, weight) is accumulated with
      ``scatter_add_``, much faster on CPU than ``index_put_(accumulate=True)``.

    Memory: one float (3, P + 3, P + 3, P + 3) accumulator, P = the padded size (27 MB at D = 64, 210 MB at 128).
    """

    def __init__(self, backprojector: Backprojector) -> None:
        self.backprojector = backprojector
        size = backprojector.padded_size
        dtype, device = backprojector.weight_sum.dtype, backprojector.weight_sum.device
        self._grid = size + 3
        self._sums = torch.zeros(3, self._grid**3, dtype=dtype, device=device)
        k = torch.arange(size, device=device) - size // 2
        ky, kx = torch.meshgrid(k, k, indexing="ij")
        paired = (ky > -(size // 2)) & (kx > -(size // 2))
        half = paired & ((kx > 0) | ((kx == 0) & (ky >= 0)))
        flat = torch.arange(size * size, device=device)
        self._half, self._unpaired = flat[half.flatten()], flat[~paired.flatten()]
        self._freqs_px = torch.stack((kx, ky), dim=-1).reshape(-1, 2).to(dtype)  # same lattice as slice_coordinates_px
        # DC is its own mirror: weighted by 1/2 (sqrt on both F and CTF) so that it counts once after mirroring.
        dc = (size // 2) * size + size // 2
        self._half_scale = torch.where(self._half == dc, 0.5**0.5, 1.0).to(dtype)
        self.pixels = torch.cat((self._half, self._unpaired))  # the lattice points used, flat [y, x] indices

    def ctf_at_pixels(self, pixel_size_angstrom: torch.Tensor | float, **params) -> torch.Tensor:
        """CTF (B, M) at :attr:`pixels` of the padded lattice, for :meth:`insert`: about half the work of the
        whole (B, P, P) lattice. Computed in float64.

        Arguments as :func:`ctf_for_images` (per-image tensors (B,) or scalars)."""
        size = self.backprojector.padded_size
        pixel_size = torch.as_tensor(pixel_size_angstrom, dtype=torch.float64, device=self.pixels.device)
        freqs = self._freqs_px[self.pixels].to(torch.float64)[:, None, :] / size  # (M, 1, 2) cycles/px
        ctf = compute_ctf(freqs / pixel_size[..., None, None, None], **params)  # (B, M, 1)
        return ctf[..., 0].to(self._sums.dtype)

    def insert(self, images: torch.Tensor, rotations: torch.Tensor, ctf: torch.Tensor) -> None:
        """Add real images (B, D, D) with poses (B, 3, 3) and CTF, (B, P, P) on the padded lattice or (B, M) at
        :attr:`pixels` (see :meth:`ctf_at_pixels`)."""
        size = self.backprojector.padded_size
        if ctf.dim() == 3:
            if ctf.shape[-2:] != (size, size):
                raise ValueError(f"ctf must be on the padded {size}-pixel lattice, got shape {tuple(ctf.shape)}")
            ctf = ctf.reshape(len(ctf), -1)[:, self.pixels]
        elif ctf.shape[-1] != len(self.pixels):
            raise ValueError(f"ctf must be (B, {size}, {size}) or (B, {len(self.pixels)}), got {tuple(ctf.shape)}")
        dtype = self._sums.dtype
        padded = pad_centered(images.to(dtype), size, ndim=2)
        spectra = fft2_centered(padded).reshape(len(images), -1)
        ctf = ctf.to(dtype)
        rotations = rotations.to(dtype)
        n_half, scale = len(self._half), self._half_scale
        self._scatter_half(spectra[:, self._half] * scale, ctf[:, :n_half] * scale, self._half, rotations)
        self._scatter_direct(spectra[:, self._unpaired], ctf[:, n_half:], self._unpaired, rotations)

    def _coordinates(self, pixels: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """Voxel coordinates (B * M, 3) (x, y, z), 0 = first voxel, of image pixels (M,) at poses (B, 3, 3)."""
        coords = torch.einsum("mi,bij->bmj", self._freqs_px[pixels], rotations[:, :2, :])
        return coords.reshape(-1, 3) + self.backprojector.padded_size // 2

    def _scatter_half(self, spectra: torch.Tensor, ctf: torch.Tensor, pixels: torch.Tensor,
                      rotations: torch.Tensor) -> None:
        size, grid = self.backprojector.padded_size, self._grid
        coords = self._coordinates(pixels, rotations)
        base = torch.floor(coords)
        frac = coords - base
        base = base.long()
        spectra, ctf = spectra.reshape(-1), ctf.reshape(-1)
        reaching = ((base >= -1) & (base <= size)).all(-1)  # a corner or a mirrored corner on the grid
        if not bool(reaching.all()):
            keep = reaching.nonzero().squeeze(1)
            base, frac, ctf, spectra = base[keep], frac[keep], ctf[keep], spectra[keep]
        weighted = ctf * spectra
        channels = (weighted.real, weighted.imag, ctf * ctf)
        flat_base = ((base[:, 2] + 1) * grid + base[:, 1] + 1) * grid + base[:, 0] + 1
        fx, fy, fz = frac.unbind(-1)
        factors_x, factors_y, factors_z = (1 - fx, fx), (1 - fy, fy), (1 - fz, fz)
        for dz in (0, 1):
            for dy in (0, 1):
                weight_yz = factors_y[dy] * factors_z[dz]
                for dx in (0, 1):
                    weight = weight_yz * factors_x[dx]
                    index = flat_base + ((dz * grid + dy) * grid + dx)
                    for channel, values in zip(self._sums, channels):
                        channel.scatter_add_(0, index, values * weight)

    def _scatter_direct(self, spectra: torch.Tensor, ctf: torch.Tensor, pixels: torch.Tensor,
                        rotations: torch.Tensor) -> None:
        """Unpaired samples, straight into the backprojector's sums (corners off the grid dropped)."""
        size = self.backprojector.padded_size
        coords = self._coordinates(pixels, rotations)
        base = torch.floor(coords)
        frac = coords - base
        base = base.long()
        weighted = (ctf * spectra).reshape(-1)
        values = torch.stack((weighted.real, weighted.imag), dim=-1)
        weights = (ctf * ctf).reshape(-1)
        volume = torch.view_as_real(self.backprojector.volume_sum).view(-1, 2)
        weight_sum = self.backprojector.weight_sum.view(-1)
        for corner in ((0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)):
            offset = torch.tensor(corner, device=base.device)
            index = base + offset
            weight = torch.where(offset.bool(), frac, 1 - frac).prod(-1)
            weight = weight * ((index >= 0) & (index < size)).all(-1)
            x, y, z = index.clamp(0, size - 1).unbind(-1)
            flat = (z * size + y) * size + x
            volume.index_add_(0, flat, values * weight[:, None])
            weight_sum.index_add_(0, flat, weights * weight)

    def flush(self) -> None:
        """Add the accumulated half plane and its conjugate mirror image into the backprojector's sums."""
        size, grid = self.backprojector.padded_size, self._grid
        sums = self._sums.view(3, grid, grid, grid)
        inner = sums[:, 1 : size + 1, 1 : size + 1, 1 : size + 1]  # voxel m, m = 0 .. P - 1
        mirror = sums[:, 2 : size + 2, 2 : size + 2, 2 : size + 2].flip(1, 2, 3)  # voxel P - m, the mirror of m
        volume = torch.view_as_real(self.backprojector.volume_sum)
        volume[..., 0] += inner[0] + mirror[0]
        volume[..., 1] += inner[1] - mirror[1]
        self.backprojector.weight_sum += inner[2] + mirror[2]
        self._sums.zero_()
