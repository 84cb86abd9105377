"""The classical ab initio that teaches the encoder: its slice/insert pair, refinement, frames, and both teachers."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from cryofire import physics
from cryofire.errors import ConfigError
from cryofire.evaluate import rotation_errors_deg
from cryofire.io import read_star
from cryofire.model import ab_initio
from cryofire.model.ab_initio import class_explained_power, initial_poses, start_quality, swap_search
from cryofire.model.em_init import EMConfig, StochasticEM
from cryofire.model.em_refine import (
    class_frames,
    class_margins,
    in_first_class_frame,
    real_space_maps,
    reassign_ambiguous,
    reconstruct,
    refine,
    worst_fits,
)
from cryofire.model.image_formation import observed_spectrum, recentre
from cryofire.model.superpose import RigidFit, fit_rigid_part, point_reflection
from cryofire.model.trilinear import insert_slices, sample_slices, voxel_offsets
from cryofire.simulate import SimulationConfig, simulate_dataset
from cryofire.simulate.dataset import ImageModel, draw_metadata
from cryofire.train import TrainConfig, train
from cryofire.train.checkpoint import load_checkpoint
from cryofire.train.infer import infer
from cryofire.train.loop import split_rows
from cryofire.train.data import CTF_PARAMETER_COLUMNS, ctf_from_parameters


def test_insert_is_the_adjoint_of_the_trilinear_slice():
    generator = torch.Generator().manual_seed(0)
    grid = torch.randn(3, 12, 12, 12, generator=generator)
    points = (torch.rand(4, 30, 3, generator=generator) - 0.5) * 10
    values = torch.randn(4, 30, 3, generator=generator)
    left = (sample_slices(grid, points) * values).sum()
    right = (grid * insert_slices(values, points, 12)).sum()
    assert torch.allclose(left, right, rtol=1e-5)


def _one_state_images(size: int, n_images: int) -> tuple:
    """SNR-1 images of one state (D=size) as an EM sees them: an EM (1 class), spectra, CTFs, true rotations and
    shifts (px)."""
    return _state_images(size, n_images, [1.0, 0.0])[:5]


def _state_images(size: int, n_images: int, state_weights: list[float]) -> tuple:
    """:func:`_one_state_images` of the phantom's states drawn with ``state_weights``, and the states (N,)."""
    config = SimulationConfig(n_images=n_images, box_size=size, pixel_size_angstrom=160 / size, snr=1.0,
                              shift_std_px=1.0, state_weights=state_weights, seed=2)
    table = draw_metadata(config)
    images = ImageModel(config, table).clean_images(np.arange(n_images)).float()
    images += torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) * images.std()
    truth = physics.euler_to_matrix(
        *(torch.tensor(table[c].to_numpy()) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))).float()
    origins = table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(np.float32)
    shifts = torch.tensor(origins) / config.pixel_size_angstrom
    em = StochasticEM(size, n_images, EMConfig(classes=1))
    count = em.lattice.count_within(size / 2)
    observed = observed_spectrum(images * physics.soft_circular_window(size, 0.85, 0.99).float(), em.lattice, count)
    parameters = torch.tensor(table[list(CTF_PARAMETER_COLUMNS)].to_numpy(np.float32))
    ctf = em.lattice.gather(ctf_from_parameters(parameters, size), count)
    return em, observed, ctf, truth, shifts, torch.tensor(table["rlnClassNumber"].to_numpy() - 1)


def test_refinement_from_perturbed_poses_recovers_them():
    """Maps rebuilt from poses 10 deg off, then local searches, bring SNR-1 images of one state close to the truth."""
    em, observed, ctf, truth, shifts = _one_state_images(24, 400)
    noise = torch.randn(len(truth), 3, generator=torch.Generator().manual_seed(1))
    rotations = physics.axis_angle_to_matrix(noise * np.deg2rad(10.0) / np.sqrt(3)).float() @ truth
    start = np.median(rotation_errors_deg(rotations.double().numpy(), truth.double().numpy()))
    classes = torch.zeros(len(truth), dtype=torch.long)
    for radius in (6, 9, 12):
        rotations, shifts, classes, _ = refine(em, observed, ctf, rotations, shifts, classes, radius, 0.0)
    end = np.median(rotation_errors_deg(rotations.double().numpy(), truth.double().numpy()))
    assert start > 7.0 and end < 0.5 * start


def test_the_images_in_a_wrong_basin_are_among_the_worst_fits():
    """A quarter of the images start at random rotations: after a local search they still fit worst, so the 40 %
    that refinement searches globally again hold them."""
    em, observed, ctf, truth, shifts = _one_state_images(24, 400)
    classes = torch.zeros(len(truth), dtype=torch.long)
    reconstruct(em, observed, ctf, truth, shifts, classes, 12)
    lost = torch.arange(len(truth)) % 4 == 0
    start = torch.where(lost[:, None, None], physics.random_rotations(len(truth), generator=torch.Generator()
                                                                      .manual_seed(5)).float(), truth)
    count = em.lattice.count_within(12)
    rotations, _, scores = em.local_search(0, observed[:, :count], ctf[:, :count], start, shifts, 8.0, 0.5, 3, 48)
    still_lost = torch.from_numpy(rotation_errors_deg(rotations.double().numpy(), truth.double().numpy()) > 20)
    flagged = torch.zeros(len(truth), dtype=torch.bool)
    flagged[worst_fits(scores, observed[:, :count], 0.4)] = True
    assert still_lost.sum() > 80 and (flagged & still_lost).sum() >= 0.95 * still_lost.sum()


def test_each_class_keeps_its_own_candidates_in_the_global_assignment():
    """Class 0 fits the images better at the search radius, but 30 deg away from their poses, and holds nothing
    beyond it; class 1 is their true map with its low frequencies at 0.8 of their amplitude. The global assignment still
    finds the images' poses in class 1: one class's best candidates do not crowd out another's (D=24, search at
    5 px: poses ~3.6 deg off, limited by the search radius)."""
    em, observed, ctf, truth, shifts = _one_state_images(24, 200)
    search_radius = 5.0
    turn = physics.axis_angle_to_matrix(torch.tensor([0.0, math.radians(30.0), 0.0])).float()
    maps = []
    for rotations in (truth @ turn, truth):
        reconstruct(em, observed, ctf, rotations, shifts, torch.zeros(len(truth), dtype=torch.long), 12)
        maps.append(em.volume_ft[0].clone())
    two = StochasticEM(24, len(truth), EMConfig(classes=2, seed=1))
    low = two.radius_px_3d <= search_radius
    two.volume_ft[0] = maps[0] * low
    two.volume_ft[1] = maps[1] * torch.where(low, 0.8, 1.0)
    count = two.lattice.count_within(search_radius)
    low_scores = [two.local_search(k, observed[:, :count], ctf[:, :count], rotations, shifts, 1.0, 0.25, 2, 8)[2]
                  for k, rotations in ((0, truth @ turn), (1, truth))]
    assert (low_scores[0] < low_scores[1]).float().mean() > 0.9  # class 0's wrong pose wins at the search radius
    rotations, _, classes, _ = two.assign(observed, ctf, 12, global_radius_px=search_radius)
    errors = rotation_errors_deg(rotations.double().numpy(), truth.double().numpy())
    assert (classes == 1).float().mean() > 0.95 and np.median(errors) < 5.0  # with the candidates of all classes
    # pooled (before the ninth session): 7.5 % in class 1, 31 deg


def test_the_class_margin_is_the_gap_between_the_two_best_classes_in_units_of_the_power():
    scores = torch.tensor([[-5.0, -3.0, -1.0], [-2.0, -6.0, -6.5]])
    observed = torch.ones(2, 4, 2)  # power 8 each
    margins = class_margins(scores, observed, count=4)
    assert torch.allclose(margins, torch.tensor([2.0 / 8, 0.5 / 8]))


def test_images_held_in_the_wrong_class_at_a_wrong_pose_are_reassigned():
    """A fifth of state 1's images sit in state 0's class at poses 30 deg off; given the smallest margins, they are
    searched again in both class maps rebuilt without them and return to their state near their poses (D=24, ~200
    images per map: ~5 deg). That leaving them out of the maps matters shows only at low SNR, where they build a
    ghost of themselves in the wrong class (bench/RESULTS.md, ninth session); at this SNR they would be found even
    with them in the maps."""
    _, observed, ctf, truth, shifts, states = _state_images(24, 500, [0.5, 0.5])
    em = StochasticEM(24, len(truth), EMConfig(classes=2, seed=1))
    turn = physics.axis_angle_to_matrix(torch.tensor([0.0, math.radians(30.0), 0.0])).float()
    misplaced = (states == 1) & (torch.arange(len(states)) % 5 == 0)
    rotations = torch.where(misplaced[:, None, None], truth @ turn, truth)
    classes = torch.where(misplaced, 0, states)
    margins = torch.where(misplaced, 0.0, 1.0) + torch.rand(len(states), generator=torch.Generator().manual_seed(0))
    fraction = 1.5 * float(misplaced.float().mean())  # the misplaced images and some others
    new_r, _, new_c = reassign_ambiguous(em, observed, ctf, rotations, shifts, classes, margins, fraction, 12)
    errors = rotation_errors_deg(new_r[misplaced].double().numpy(), truth[misplaced].double().numpy())
    assert misplaced.sum() >= 40 and (new_c[misplaced] == 1).float().mean() > 0.9 and np.median(errors) < 7.0
    assert (new_c[~misplaced] == states[~misplaced]).float().mean() > 0.97


def test_maps_from_the_true_poses_explain_more_of_the_images_than_maps_from_wrong_ones():
    """The criterion that picks the best EM start: maps rebuilt from the true poses explain more of SNR-1 images'
    power than maps rebuilt from random poses."""
    em, observed, ctf, truth, shifts = _one_state_images(24, 400)
    em.config = EMConfig(classes=1, unblend_images=0)  # the explained power alone, without the un-blending gain
    classes = torch.zeros(len(truth), dtype=torch.long)
    wrong = physics.random_rotations(len(truth), generator=torch.Generator().manual_seed(3)).float()
    explained = []
    for rotations in (truth, wrong):
        reconstruct(em, observed, ctf, rotations, shifts, classes, em.config.end_radius_px)
        explained.append(start_quality(em, observed[:100], ctf[:100])[0])
    assert explained[0] > explained[1] + 0.05


@pytest.mark.parametrize("seed", [5, 6])  # the best start is the last with seed 5, the first with seed 6
def test_the_em_start_whose_maps_explain_the_images_best_is_kept(seed):
    """The kept start is the one of highest explained power plus un-blending gain (its probe's classes checked)."""
    em, observed, ctf, *_ = _one_state_images(16, 128)
    seen = {}
    config = EMConfig(classes=1, iterations=30, refine_rounds=1, research_fraction=0.0, starts=3, probe_images=64,
                      unblend_images=64, unblend_rounds=2, unblend_tries=1, seed=seed)

    def progress(stage: str, info: dict, poses: tuple | None) -> None:
        if stage == "start":
            seen[info["start"]] = info["explained_power"] + info["unblend_gain"]

    kept, *_ = initial_poses(observed, ctf, 16, config, progress=progress)
    assert len(seen) == 3 and kept.config.seed == seed + 1000 * (max(seen, key=seen.get) - 1)


def test_a_class_map_from_wrong_poses_explains_its_images_clearly_less():
    """The per-class diagnostic of the assignment: class 0 (even images) rebuilt from the true poses, class 1 (odd
    images) from random ones (a class stuck in a wrong optimum), or from the true ones too."""
    _, observed, ctf, truth, shifts = _one_state_images(16, 300)
    config = EMConfig()
    classes = torch.arange(len(truth)) % 2
    count = StochasticEM(16, 1, config).lattice.count_within(config.end_radius_px)
    wrong = physics.random_rotations(len(truth), generator=torch.Generator().manual_seed(3)).float()
    per_class = []
    for odd_rotations in (wrong, truth):
        em = StochasticEM(16, len(truth), config)
        rotations = torch.where(classes[:, None, None] == 1, odd_rotations, truth)
        reconstruct(em, observed, ctf, rotations, shifts, classes, config.end_radius_px)
        scores = torch.empty(len(truth))
        for k in (0, 1):
            mine = classes == k
            *_, scores[mine] = em.local_search(k, observed[mine, :count], ctf[mine, :count], rotations[mine],
                                               shifts[mine], 1.0, 0.25, 1, 4)
        per_class.append(class_explained_power(em, observed, scores, classes))
    assert per_class[0][0] - per_class[0][1] > 0.2
    assert abs(per_class[1][0] - per_class[1][1]) < 0.03


SMALL_MODEL = {"encoder_channels": 8, "encoder_max_channels": 32, "encoder_hidden_dim": 32, "decoder_width": 32,
               "decoder_depth": 1, "num_fourier_features": 16, "zdim": 2}


@pytest.fixture(scope="module")
def particles(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("sim")
    config = SimulationConfig(n_images=128, box_size=16, pixel_size_angstrom=10.0, snr=10.0, seed=3)
    return str(simulate_dataset(config, folder))


def test_training_with_the_em_teacher_logs_its_targets_and_writes_its_poses_and_classes(particles, tmp_path):
    config = TrainConfig(epochs=2, batch_size=16, learning_rate=1e-3, model=SMALL_MODEL, search_fraction=1.0,
                         teacher="em", em_iterations=20, em_starts=2, val_fraction=0.25)
    run = train(particles, tmp_path / "run", config)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    searches = [r for r in records if r["event"] == "search"]
    assert len(searches) == 1 and sum(searches[0]["em_class_sizes"]) == 96  # the training rows
    assert 0.0 <= searches[0]["target_rotation_error_median_deg"] <= 180.0
    # taught for the whole run: poses.star holds the teacher's poses (RELION angles of its matrices) and classes
    # (1-based) for the training rows, the encoder's classes (its first 2 latent coordinates) for the held-out rows
    teacher = load_checkpoint(run / "checkpoint.pt")["teacher"]
    written = read_star(run / "poses.star", allow_absolute_paths=True)
    angles = [torch.tensor(written[c].to_numpy()) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]
    matrices = physics.euler_to_matrix(*angles).float()
    taught = np.ones(len(written), bool)
    taught[split_rows(len(written), config.val_fraction, config.seed)[1]] = False
    assert torch.allclose(matrices[taught], teacher["rotations"][taught], atol=1e-4)
    classes = written["rlnClassNumber"].to_numpy()
    np.testing.assert_array_equal(classes[taught], teacher["classes"].numpy()[taught] + 1)
    latents = np.load(run / "latents.npy")
    np.testing.assert_array_equal(classes[~taught], latents[~taught, :2].argmax(1) + 1)
    # `cryofire infer` gives the same images the encoder's classes
    inferred = read_star(infer(run, particles, tmp_path / "infer") / "poses.star", allow_absolute_paths=True)
    np.testing.assert_array_equal(inferred["rlnClassNumber"].to_numpy(), latents[:, :2].argmax(1) + 1)


def _turned(volume: torch.Tensor, rotation: torch.Tensor, translation_px: torch.Tensor) -> torch.Tensor:
    """``V'(x) = V(R^T (x - v))`` on the same centred grid (x, y, z voxel offsets), by trilinear interpolation."""
    size = volume.shape[-1]
    points = voxel_offsets(size)
    return sample_slices(volume[None], ((points - translation_px) @ rotation)[None])[0, :, 0].reshape(volume.shape)


def _padded_ft(volume: torch.Tensor) -> torch.Tensor:
    size = volume.shape[-1]
    padded = torch.nn.functional.pad(volume.float(), (size // 2,) * 6)
    return physics.fft3_centered(padded).to(torch.complex64) / size


def test_two_conformations_are_superposed_by_their_rigid_part():
    """The two states of the phantom (arm turned 35 degrees), the second turned by 15 degrees and moved 1.5 px:
    the fit finds that turn and move (the body), not the compromise a whole-map fit gives."""
    size = 32
    config = SimulationConfig(n_images=4, box_size=size, pixel_size_angstrom=160 / size, seed=5)
    model = ImageModel(config, draw_metadata(config))
    states = [model.true_volume(state=k).float() for k in (0, 1)]
    rotation = physics.axis_angle_to_matrix(torch.tensor([0.15, -0.2, 0.1]))
    translation = torch.tensor([1.0, -0.8, 0.7])
    em = StochasticEM(size, 0, EMConfig(classes=2))
    em.volume_ft[0] = _padded_ft(states[0])
    em.volume_ft[1] = _padded_ft(_turned(states[1], rotation, translation))

    identity, fitted = class_frames(em)
    assert not identity.mirrored and not fitted.mirrored
    error_deg = rotation_errors_deg(fitted.rotation[None].double().numpy(), rotation[None].double().numpy())[0]
    assert error_deg < 3.0 and (fitted.translation - translation).norm() < 0.5
    whole, _ = fit_rigid_part(real_space_maps(em)[0], real_space_maps(em)[1], torch.Generator().manual_seed(0),
                              passes=1)  # the compromise, for contrast
    assert rotation_errors_deg(whole[None].double().numpy(), rotation[None].double().numpy())[0] > 10.0


@pytest.mark.parametrize("size", [6, 7])
def test_point_reflection_sends_each_voxel_to_minus_its_offset(size):
    """A single voxel at offset p (from the centre voxel ``size // 2``) lands at -p, for even and odd grids."""
    grid = torch.zeros(size, size, size)
    centre = size // 2
    grid[centre + 2, centre - 1, centre + 1] = 1.0  # [z, y, x]
    reflected = point_reflection(grid[None])[0]
    assert reflected[centre - 2, centre + 1, centre - 1] == 1.0 and reflected.sum() == 1.0


def test_a_class_map_in_the_other_hand_is_superposed_by_its_mirror_image():
    """The second state of the phantom in the other hand (point reflection), turned 120 degrees and moved: the fit
    finds the mirror, that turn and that move; a local fit from the identity could not reach them. The fit's own
    precision here is 2.3-3.1° (four generator seeds in each hand, twentieth session); the 3.1° of this seed on that
    machine failed the earlier bound of 3°, set on a machine where it gave less. A failed fit is tens of degrees off."""
    size = 32
    config = SimulationConfig(n_images=4, box_size=size, pixel_size_angstrom=160 / size, seed=5)
    model = ImageModel(config, draw_metadata(config))
    states = [model.true_volume(state=k).float() for k in (0, 1)]
    axis = torch.tensor([1.2, -1.1, 1.0])
    rotation = physics.axis_angle_to_matrix(axis * (math.radians(120.0) / axis.norm()))
    translation = torch.tensor([-0.7, 1.2, 0.5])
    em = StochasticEM(size, 0, EMConfig(classes=2))
    em.volume_ft[0] = _padded_ft(states[0])
    em.volume_ft[1] = _padded_ft(point_reflection(_turned(states[1], rotation, translation)[None])[0])

    fitted = class_frames(em)[1]
    assert fitted.mirrored
    error_deg = rotation_errors_deg(fitted.rotation[None].double().numpy(), rotation[None].double().numpy())[0]
    assert error_deg < 4.0 and (fitted.translation - translation).norm() < 0.5


@pytest.mark.parametrize("mirrored", [False, True])
def test_poses_in_a_turned_and_moved_class_map_are_re_expressed_in_the_first(mirrored):
    """A slice of ``V'(x) = V(R^T (x - v))``, or of its point reflection ``V'(-x)`` (the other hand), at pose A
    and shift t equals the slice of V at the re-expressed pose and shift."""
    size = 16
    generator = torch.Generator().manual_seed(6)
    volume = torch.nn.functional.pad(torch.rand(8, 8, 8, generator=generator), (4,) * 6)
    volume = physics.ifft3_centered(physics.fft3_centered(volume) * (physics.frequency_grid_3d(size).norm(dim=-1)
                                                                     < 0.25)).real  # smooth
    rotation = physics.axis_angle_to_matrix(torch.tensor([0.2, 0.1, -0.3]))
    translation = torch.tensor([0.6, -1.1, 0.4])
    em = StochasticEM(size, 0, EMConfig(classes=2))
    moved = _turned(volume, rotation, translation)
    em.volume_ft[0] = _padded_ft(volume)
    em.volume_ft[1] = _padded_ft(point_reflection(moved[None])[0] if mirrored else moved)
    poses = physics.random_rotations(5, generator=generator).float()
    shifts = torch.randn(5, 2, generator=generator)
    new_r, new_t = in_first_class_frame(poses, shifts, torch.ones(5, dtype=torch.long),
                                        [RigidFit(torch.eye(3), torch.zeros(3), False, 1.0),
                                         RigidFit(rotation, translation, mirrored, 1.0)])
    count = em.lattice.count_within(size / 4)
    coords = em.lattice.coords[:count]

    def image(klass: int, rotations: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
        slices = em._class_slices(em._points(rotations, count), [klass])
        return torch.stack([recentre(s[None], coords, -t[None, None])[0, 0] for s, t in zip(slices, shifts_px)])

    turned, back = image(1, poses, shifts), image(0, new_r, new_t)
    assert (turned - back).norm() < 0.05 * turned.norm()


def test_training_with_the_search_teacher_logs_its_searches(particles, tmp_path):
    config = TrainConfig(epochs=2, batch_size=16, learning_rate=1e-3, model=SMALL_MODEL, search_fraction=0.5,
                         teacher="search", search_rotations=256)
    run = train(particles, tmp_path / "run", config)
    searches = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"search"' in line]
    assert len(searches) >= 1 and all(0.0 <= r["target_rotation_error_median_deg"] <= 180.0 for r in searches)


def test_more_em_classes_than_latent_coordinates_is_refused(particles, tmp_path):
    config = TrainConfig(epochs=1, model={**SMALL_MODEL, "zdim": 1}, search_fraction=1.0, teacher="em", em_classes=2)
    with pytest.raises(ConfigError, match="em_classes 2 needs zdim >= 2"):
        train(particles, tmp_path / "run", config)


def test_the_swap_search_takes_each_state_s_best_map_from_any_start():
    """Two starts of two classes (columns start * 2 + class): start 0 explains state A's images (rows 0-49) well and
    state B's poorly, start 1 the reverse; the search from start 0's maps ends with the best map of each state."""
    explained = torch.full((100, 4), 0.5)
    explained[:50, 0], explained[50:, 1] = 0.70, 0.62  # start 0: A right, B poor
    explained[:50, 2], explained[50:, 3] = 0.63, 0.69  # start 1: A poor, B right
    assert sorted(swap_search(explained, [0, 1])) == [0, 3]
    assert sorted(swap_search(explained, [2, 3])) == [0, 3]
    assert sorted(swap_search(explained[:, :2], [0, 1])) == [0, 1]  # nothing to swap in


def test_a_mixed_start_keeps_each_state_s_right_map_from_whichever_start_has_it(monkeypatch):
    """Two EM starts (stubbed with maps rebuilt from known poses), each with one state's map from the true poses and
    the other's from random ones: the kept maps are the two right ones, from different starts."""
    _, observed, ctf, truth, shifts, states = _state_images(24, 400, [0.5, 0.5])
    config = EMConfig(classes=2, starts=2, probe_images=120, unblend_images=0, seed=1)
    wrong = physics.random_rotations(len(truth), generator=torch.Generator().manual_seed(3)).float()
    starts = []
    for right_state in (0, 1):
        em = StochasticEM(24, len(truth), replace(config, seed=1 + 1000 * right_state))
        rotations = torch.where((states == right_state)[:, None, None], truth, wrong)
        reconstruct(em, observed, ctf, rotations, shifts, states, config.end_radius_px)
        starts.append(em)
    right_maps = torch.stack([starts[0].volume_ft[0], starts[1].volume_ft[1]]).clone()
    monkeypatch.setattr(ab_initio, "em_start", lambda *args, **kwargs: starts[args[4]])
    seen = {}
    kept = ab_initio.best_em_start(observed, ctf, 24, config,
                                   progress=lambda stage, info, poses: seen.setdefault(stage, []).append(info))
    assert [info["start"] for info in seen["start"]] == [1, 2]
    assert seen["mixed start"][0]["maps"] == [(1, 0), (2, 1)]
    mixed = seen["mixed start"][0]["explained_power"]
    assert mixed > max(info["explained_power"] for info in seen["start"]) + 0.01
    assert torch.equal(kept.volume_ft, right_maps)
