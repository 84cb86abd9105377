"""CryoFireModel: encoder + hypervolume + image formation + losses, for one training step.

Pose modes:
  * ``'abinit'``: the encoder predicts ``num_pose_heads`` poses per image; with the symmetric loss
    it also encodes the image mirrored along x, maps those poses back to the original image
    (:func:`cryofire.model.losses.mirror_poses`) and every hypothesis is scored against the
    original image; each image keeps its best (winner-takes-all).
  * ``'fixed'``: poses and shifts come from the batch; the encoder only predicts z.
  * ``'refine'``: the encoder predicts a correction, ``R = dR @ R_given`` and
    ``t = t_given + dt``; it starts at the identity and zero.
The symmetric loss applies in 'abinit' only: given poses already fix the mirror ambiguity.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from cryofire.model.config import ModelConfig
from cryofire.model.decoder import HyperVolume
from cryofire.model.encoder import EncoderOutput, ImageEncoder
from cryofire.model.image_formation import (
    HalfPlaneLattice,
    observed_spectrum,
    predict_spectrum,
    recentre,
)
from cryofire.model.losses import (
    best_hypothesis,
    fourier_mse,
    kl_divergence,
    mirror_images,
    mirror_poses,
)
from cryofire.model.schedule import frequency_radius_px, in_pose_only_phase, pose_only_latents
from cryofire.physics import soft_circular_window


@dataclass
class Hypotheses:
    """P pose hypotheses per image, all expressed for the original (unmirrored) image.

    Attributes:
        rotations: (B, P, 3, 3) RELION matrices.
        shifts_px: (B, P, 2) shifts (x, y) in px that re-centre the image (RELION origin sign).
        z_mean: (B, P, zdim) latent means of the path each hypothesis came from.
        z_logvar: (B, P, zdim) log-variances, or None for a deterministic encoder.
        mirrored: (P,) bool, True for hypotheses predicted from the mirrored image.
    """

    rotations: torch.Tensor
    shifts_px: torch.Tensor
    z_mean: torch.Tensor
    z_logvar: torch.Tensor | None
    mirrored: torch.Tensor


def _take(values: torch.Tensor, winner: torch.Tensor) -> torch.Tensor:
    """values (B, P, ...) -> values[b, winner[b]] (B, ...)."""
    return values[torch.arange(values.shape[0], device=values.device), winner]


def _as_hypotheses(out: EncoderOutput, mirrored: bool) -> Hypotheses:
    """Encoder output with H heads -> H hypotheses, the path's latent repeated per head."""
    heads = out.rotations.shape[1]

    def repeat(values: torch.Tensor | None) -> torch.Tensor | None:
        return None if values is None else values[:, None].expand(-1, heads, -1)

    flags = torch.full((heads,), mirrored, dtype=torch.bool, device=out.rotations.device)
    return Hypotheses(out.rotations, out.shifts_px, repeat(out.z_mean), repeat(out.z_logvar), flags)


def _concatenate(first: Hypotheses, second: Hypotheses) -> Hypotheses:
    """Join two sets of hypotheses for the same images along the hypothesis axis."""
    logvar = None if first.z_logvar is None else torch.cat((first.z_logvar, second.z_logvar), 1)
    return Hypotheses(
        rotations=torch.cat((first.rotations, second.rotations), 1),
        shifts_px=torch.cat((first.shifts_px, second.shifts_px), 1),
        z_mean=torch.cat((first.z_mean, second.z_mean), 1),
        z_logvar=logvar,
        mirrored=torch.cat((first.mirrored, second.mirrored)),
    )


class CryoFireModel(nn.Module):
    """The amortized model; see the module docstring and :class:`ModelConfig`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.schedule = config.schedule_config()
        self.encoder = ImageEncoder(config.box_size, config.encoder_config())
        self.decoder = HyperVolume(config.box_size, config.decoder_config())
        self.lattice = HalfPlaneLattice(config.box_size)
        window = soft_circular_window(
            config.box_size, config.window_inner_fraction, config.window_outer_fraction
        )
        self.register_buffer("window", window.float(), persistent=False)
        if config.pose_mode == "refine":
            self.encoder.start_at_identity()

    def encode(
        self,
        images: torch.Tensor,
        given_rotations: torch.Tensor | None = None,
        given_shifts_px: torch.Tensor | None = None,
    ) -> Hypotheses:
        """Pose hypotheses and latents for real-space images (B, D, D), with no decoder work.

        'fixed' and 'refine' need ``given_rotations`` (B, 3, 3) and ``given_shifts_px`` (B, 2).
        With one head and no symmetric loss (or a given pose) P = 1 and ``rotations[:, 0]`` is
        the answer; otherwise the best hypothesis needs the decoder: use :meth:`forward`.
        """
        return self._encode_windowed(images * self.window, given_rotations, given_shifts_px)

    def _encode_windowed(
        self,
        windowed: torch.Tensor,
        given_rotations: torch.Tensor | None,
        given_shifts_px: torch.Tensor | None,
    ) -> Hypotheses:
        mode = self.config.pose_mode
        if mode == "abinit" and self.config.symmetric_loss:
            return self._encode_symmetric(windowed)
        out = self.encoder(windowed)
        if mode == "abinit":
            return _as_hypotheses(out, mirrored=False)
        if given_rotations is None or given_shifts_px is None:
            raise ValueError(f"pose mode {mode!r} needs given_rotations and given_shifts_px")
        given_r, given_t = given_rotations[:, None].float(), given_shifts_px[:, None].float()
        if mode == "fixed":
            out = replace(out, rotations=given_r, shifts_px=given_t)
        else:
            out = replace(out, rotations=out.rotations @ given_r, shifts_px=out.shifts_px + given_t)
        return _as_hypotheses(out, mirrored=False)

    def _encode_symmetric(self, windowed: torch.Tensor) -> Hypotheses:
        """Encode images and their mirrors in one pass; 2H hypotheses for the original images."""
        batch = windowed.shape[0]
        out = self.encoder(torch.cat((windowed, mirror_images(windowed))))
        original, mirrored = out.rows(slice(0, batch)), out.rows(slice(batch, None))
        rotations, shifts_px = mirror_poses(mirrored.rotations, mirrored.shifts_px)
        mapped = replace(mirrored, rotations=rotations, shifts_px=shifts_px)
        return _concatenate(_as_hypotheses(original, False), _as_hypotheses(mapped, True))

    def decoder_latents(self, hypotheses: Hypotheses, images_seen: int) -> torch.Tensor:
        """Latents (B, P, zdim) given to the decoder: random in the pose-only phase (one draw per
        image, shared by its hypotheses), a reparameterised sample when variational and training,
        else the mean."""
        batch, count, zdim = hypotheses.z_mean.shape
        if in_pose_only_phase(images_seen, self.schedule):
            noise = pose_only_latents(batch, zdim, self.schedule, hypotheses.z_mean.device)
            return noise[:, None].expand(-1, count, -1)
        if hypotheses.z_logvar is None or not self.training:
            return hypotheses.z_mean
        std = torch.exp(0.5 * hypotheses.z_logvar)
        return hypotheses.z_mean + std * torch.randn_like(std)

    def forward(
        self,
        images: torch.Tensor,
        ctf: torch.Tensor | None,
        images_seen: int,
        given_rotations: torch.Tensor | None = None,
        given_shifts_px: torch.Tensor | None = None,
        target_rotations: torch.Tensor | None = None,
        target_shifts_px: torch.Tensor | None = None,
        target_classes: torch.Tensor | None = None,
        simulated: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One step's loss and the winning pose of each image.

        Args:
            images: (B, D, D) real-space images (normalised by the data loader; windowed here).
            ctf: (B, D, D) CTF on the centred lattice (``physics.ctf_for_images``), or None.
            images_seen: images seen before this batch (drives the schedule).
            given_rotations: (B, 3, 3) RELION matrices ('fixed' and 'refine').
            given_shifts_px: (B, 2) re-centring shifts in px ('fixed' and 'refine').
            target_rotations: (B, 3, 3) poses found by a pose search ('abinit' only): the decoder
                is fitted at these poses and the encoder learns to predict them
                (:mod:`cryofire.model.pose_search`).
            target_shifts_px: (B, 2) shifts found by the pose search.
            target_classes: (B, K) one-hot classes from a classical ab initio: the encoder's first K latent
                coordinates learn the centred one-hot vector (``class_target_weight``).
            simulated: images simulated at known poses ('abinit' only, :mod:`cryofire.model.map_images`): "images"
                (S, D, D) raw, "target_rotations" (S, 3, 3), "target_shifts_px" (S, 2), "target_classes" (S, K)
                one-hot; the encoder alone learns them (``simulated_loss``, weighted as the targets above).

        Returns:
            dict with ``loss`` (scalar to minimise), ``data_loss``, ``kl`` (scalars),
            ``per_image_loss`` (B,), ``rotations`` (B, 3, 3), ``shifts_px`` (B, 2), ``z`` (B, zdim)
            encoder means and ``z_logvar`` (B, zdim) (if variational) of the winning path,
            ``z_decoded`` (B, zdim) what the decoder got, ``winner`` (B,) hypothesis index,
            ``mirrored`` (B,) bool (winner came from the mirrored image), ``radius_px`` (scalar).
        """
        windowed = images * self.window
        hyp = self._encode_windowed(windowed, given_rotations, given_shifts_px)
        pose_loss = None
        if target_rotations is not None:
            pose_loss = self._pose_target_loss(hyp, target_rotations, target_shifts_px)
            hyp = self._teacher_hypotheses(hyp, pose_loss, target_rotations, target_shifts_px)
        radius_px = frequency_radius_px(images_seen, self.config.box_size, self.schedule)
        count = self.lattice.count_within(radius_px)
        coords = self.lattice.coords[:count]
        observed = recentre(observed_spectrum(windowed, self.lattice, count), coords, hyp.shifts_px)
        ctf_values = None if ctf is None else self.lattice.gather(ctf.float(), count)
        z_decoded = self.decoder_latents(hyp, images_seen)
        predicted = predict_spectrum(self.decoder, hyp.rotations, z_decoded, coords, ctf_values)
        per_image, winner = best_hypothesis(fourier_mse(predicted, observed))
        out = {
            "per_image_loss": per_image.detach(),
            "data_loss": per_image.mean(),
            "rotations": _take(hyp.rotations, winner),
            "shifts_px": _take(hyp.shifts_px, winner),
            "z": _take(hyp.z_mean, winner),
            "z_decoded": _take(z_decoded, winner),
            "winner": winner,
            "mirrored": hyp.mirrored[winner],
            "radius_px": torch.tensor(radius_px),
        }
        if hyp.z_logvar is not None:
            out["z_logvar"] = _take(hyp.z_logvar, winner)
        out["kl"] = self._kl(out["z"], out.get("z_logvar"), images_seen)
        out["loss"] = out["data_loss"] + self.config.kl_weight * out["kl"]
        self._add_target_losses(out, pose_loss, target_classes, simulated)
        return out

    def _add_target_losses(self, out: dict[str, torch.Tensor], pose_loss: torch.Tensor | None,
                           target_classes: torch.Tensor | None, simulated: dict[str, torch.Tensor] | None) -> None:
        """Add a teacher's weighted losses to ``out["loss"]`` (and each to ``out``): the pose loss (B, P) of the
        nearest hypothesis, the class loss of the winning latent, and the loss on simulated images."""
        if pose_loss is not None:
            out["pose_loss"] = pose_loss.min(dim=1).values.mean()
            out["loss"] = out["loss"] + self.config.pose_target_weight * out["pose_loss"]
        if target_classes is not None and self.config.zdim:
            out["class_loss"] = self._class_target_loss(out["z"], target_classes)
            out["loss"] = out["loss"] + self.config.class_target_weight * out["class_loss"]
        if simulated is not None:
            out["simulated_loss"] = self._simulated_loss(simulated)
            out["loss"] = out["loss"] + out["simulated_loss"]

    def _simulated_loss(self, simulated: dict[str, torch.Tensor]) -> torch.Tensor:
        """The encoder's target losses on images simulated at known poses and classes: the pose loss of the
        nearest hypothesis, and the class loss of its latent."""
        hyp = self._encode_windowed(simulated["images"] * self.window, None, None)
        pose_loss = self._pose_target_loss(hyp, simulated["target_rotations"], simulated["target_shifts_px"])
        loss = self.config.pose_target_weight * pose_loss.min(dim=1).values.mean()
        if self.config.zdim:
            z = _take(hyp.z_mean, pose_loss.detach().argmin(dim=1))
            loss = loss + self.config.class_target_weight * self._class_target_loss(z, simulated["target_classes"])
        return loss

    @staticmethod
    def _class_target_loss(z: torch.Tensor, target_classes: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the first K latent coordinates (B, zdim) to the centred one-hot classes (B, K)."""
        dims = min(target_classes.shape[1], z.shape[1])
        target = target_classes.float() - 1.0 / target_classes.shape[1]
        return (z[:, :dims].float() - target[:, :dims]).square().sum(-1).mean()

    def _pose_target_loss(
        self, hyp: Hypotheses, target_rotations: torch.Tensor, target_shifts_px: torch.Tensor
    ) -> torch.Tensor:
        """Distance of every hypothesis to the target pose (B, P): squared chordal distance of the
        rotations plus the squared shift error in units of the shift bound."""
        rotation = (hyp.rotations - target_rotations[:, None].float()).square().sum((-2, -1))
        bound = max(self.config.max_shift_fraction * self.config.box_size, 1.0)
        shift = ((hyp.shifts_px - target_shifts_px[:, None].float()) / bound).square().sum(-1)
        return rotation + shift

    @staticmethod
    def _teacher_hypotheses(
        hyp: Hypotheses, pose_loss: torch.Tensor, target_rotations: torch.Tensor,
        target_shifts_px: torch.Tensor,
    ) -> Hypotheses:
        """One hypothesis per image at the target pose, with the latent of the encoder path
        nearest to it (the decoder is fitted at the searched pose)."""
        nearest = pose_loss.detach().argmin(dim=1)
        z_logvar = None if hyp.z_logvar is None else _take(hyp.z_logvar, nearest)[:, None]
        return Hypotheses(
            rotations=target_rotations[:, None].float(),
            shifts_px=target_shifts_px[:, None].float(),
            z_mean=_take(hyp.z_mean, nearest)[:, None],
            z_logvar=z_logvar,
            mirrored=torch.zeros(1, dtype=torch.bool, device=target_rotations.device),
        )

    def _kl(
        self, z_mean: torch.Tensor, z_logvar: torch.Tensor | None, images_seen: int
    ) -> torch.Tensor:
        """Mean KL (nats per image) of the winning latents (B, zdim); 0 when not variational or
        while the decoder gets random latents."""
        if z_logvar is None or in_pose_only_phase(images_seen, self.schedule):
            return z_mean.new_zeros(())
        return kl_divergence(z_mean, z_logvar).mean()
