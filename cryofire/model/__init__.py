"""The amortized model: encoder, hypervolume decoder, image formation, losses and schedules.

Knows nothing of files; the training loop (``cryofire.train``) feeds it batches of images and CTFs.
"""

from cryofire.model.config import POSE_MODES as POSE_MODES, ModelConfig as ModelConfig
from cryofire.model.cryofire_model import CryoFireModel as CryoFireModel, Hypotheses as Hypotheses
from cryofire.model.decoder import DecoderConfig as DecoderConfig, HyperVolume as HyperVolume
from cryofire.model.encoder import (
    EncoderConfig as EncoderConfig,
    EncoderOutput as EncoderOutput,
    ImageEncoder as ImageEncoder,
    num_stages as num_stages,
)
from cryofire.model.image_formation import (
    HalfPlaneLattice as HalfPlaneLattice,
    observed_spectrum as observed_spectrum,
    predict_spectrum as predict_spectrum,
    recentre as recentre,
    slice_coordinates as slice_coordinates,
)
from cryofire.model.losses import (
    best_hypothesis as best_hypothesis,
    fourier_mse as fourier_mse,
    kl_divergence as kl_divergence,
    mirror_images as mirror_images,
    mirror_poses as mirror_poses,
)
from cryofire.model.schedule import (
    ScheduleConfig as ScheduleConfig,
    frequency_radius_px as frequency_radius_px,
    in_pose_only_phase as in_pose_only_phase,
    pose_only_latents as pose_only_latents,
    progress as progress,
)
