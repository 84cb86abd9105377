"""Schedules as fractions of the planned images: frequency marching and the pose-only phase."""

from __future__ import annotations

import pytest
import torch

from cryofire.errors import ConfigError
from cryofire.model import (
    ScheduleConfig,
    frequency_radius_px,
    in_pose_only_phase,
    pose_only_latents,
)


def test_radius_grows_linearly_then_holds_at_nyquist() -> None:
    config = ScheduleConfig(planned_images=10_000, start_radius_px=4.0, marching_fraction=0.5)
    radii = [frequency_radius_px(seen, 64, config) for seen in (0, 2_500, 5_000, 9_000, 20_000)]
    assert radii == pytest.approx([4.0, 18.0, 32.0, 32.0, 32.0])


def test_schedule_scales_with_the_planned_images() -> None:
    small = ScheduleConfig(planned_images=10_000)
    large = ScheduleConfig(planned_images=1_000_000)
    radius_small = frequency_radius_px(1_000, 32, small)
    assert radius_small == pytest.approx(frequency_radius_px(100_000, 32, large))
    assert in_pose_only_phase(2_000, small) == in_pose_only_phase(200_000, large) is True


def test_max_radius_caps_and_no_marching_starts_at_the_end() -> None:
    capped = ScheduleConfig(planned_images=100, max_radius_px=10.0, marching_fraction=0.0)
    assert frequency_radius_px(0, 64, capped) == 10.0
    beyond = ScheduleConfig(planned_images=100, max_radius_px=100.0)
    assert frequency_radius_px(100, 32, beyond) == 16.0


def test_pose_only_phase_ends_at_its_fraction() -> None:
    config = ScheduleConfig(planned_images=1_000, pose_only_fraction=0.3)
    assert in_pose_only_phase(299, config) and not in_pose_only_phase(300, config)
    assert not in_pose_only_phase(0, ScheduleConfig(pose_only_fraction=0.0))


def test_pose_only_latents_have_the_configured_spread() -> None:
    torch.manual_seed(0)
    latents = pose_only_latents(4_000, 3, ScheduleConfig(pose_only_z_std=3.0))
    assert latents.shape == (4_000, 3)
    assert latents.std().item() == pytest.approx(3.0, rel=0.05)


@pytest.mark.parametrize(
    "options",
    [
        {"planned_images": 0},
        {"start_radius_px": 0.5},
        {"pose_only_fraction": 1.5},
        {"max_radius_px": 2.0},
    ],
)
def test_invalid_schedules_raise(options: dict) -> None:
    with pytest.raises(ConfigError):
        ScheduleConfig(**options)
