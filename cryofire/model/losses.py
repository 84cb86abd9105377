"""Losses: the masked Fourier error, the mirror (symmetric) loss and the KL of variational latents.

Spectra are carried as real pairs (..., n, 2) = (Re, Im) at the n fitted points of the half-plane
lattice (:class:`cryofire.model.image_formation.HalfPlaneLattice`), which makes every loss here
autocast-friendly (no complex tensors).

Mirror convention. ``mirror_images`` reflects an image about the box centre along x:
``mirrored[y, x] = image[y, -x]`` with pixel offsets measured from ``D // 2`` (periodically, so the
unpaired column 0 maps onto itself). If an image is the projection of V at pose R, its mirror is
the projection of V at ``diag(-1, 1, -1) @ R`` (flipping the first row of R mirrors the image's x;
flipping the third row too keeps a proper rotation, and the third row is integrated out by the
projection). A particle at offset ``-t`` in the mirrored image sits at ``(t_x, -t_y)`` in the
original, so a shift (RELION origin) ``t`` maps to ``(-t_x, t_y)``. :func:`mirror_poses` applies
both maps; it is its own inverse.
"""

from __future__ import annotations

import torch

_MIRROR_ROWS = (-1.0, 1.0, -1.0)
_MIRROR_SHIFT = (-1.0, 1.0)


def fourier_mse(predicted: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the fitted frequencies, (..., n, 2) -> (...).

    On the half-plane lattice this equals the mean squared error of the Hartley transforms over
    the full (point-symmetric) disk, since ``|dH(k)|^2 + |dH(-k)|^2 = 2 |dF(k)|^2``.
    """
    return (predicted - observed).square().sum(-1).mean(-1)


def best_hypothesis(losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Winner-takes-all over pose hypotheses: losses (B, P) -> (minimum (B,), winner index (B,))."""
    minimum, winner = losses.min(dim=-1)
    return minimum, winner


def mirror_images(images: torch.Tensor) -> torch.Tensor:
    """Mirror images (..., D, D) along x about the box centre ``D // 2`` (see module docstring)."""
    flipped = torch.flip(images, dims=(-1,))
    return torch.roll(flipped, shifts=1 - images.shape[-1] % 2, dims=-1)


def mirror_poses(
    rotations: torch.Tensor, shifts_px: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pose of an image from the pose of its mirror (and vice versa).

    Args:
        rotations: (..., 3, 3) RELION matrices of the mirrored image.
        shifts_px: (..., 2) shifts (x, y) in pixels that re-centre the mirrored image.

    Returns:
        ``diag(-1, 1, -1) @ rotations`` and ``(-shift_x, shift_y)``, the same shapes.
    """
    rows = rotations.new_tensor(_MIRROR_ROWS)[:, None]
    return rotations * rows, shifts_px * shifts_px.new_tensor(_MIRROR_SHIFT)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) in nats, summed over the latent axis: (B, Z) -> (B,).

    Non-negative, zero only at the prior; it is *added* to the loss.
    """
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(-1)
