"""cryoSPARC .cs files into the particle table: CTF units, axis-angle poses to RELION Euler angles, shifts."""

import numpy as np
import pytest
from numpy.lib import recfunctions

from cryofire.errors import InputError
from cryofire.io import read_cs, read_particles
from cryofire.io._euler import euler_to_matrix, matrix_to_euler

POSE_COLUMNS = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]


def _rodrigues(w):
    """expm([w]_x) as cos(t) I + sin(t) [k]_x + (1 - cos(t)) k k^T, k = w / t."""
    angle = np.linalg.norm(w)
    k = w / angle
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.cos(angle) * np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * np.outer(k, k)


def _relion_matrix(rot, tilt, psi):
    """RELION's Euler_angles2matrix, written out from docs/conventions.md."""
    a, b, g = np.deg2rad([rot, tilt, psi])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    return np.array([[cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
                     [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
                     [sb * ca, sb * sa, cb]])


def test_poses_match_an_independent_rotation(fixtures_dir):
    path = fixtures_dir / "cryosparc_P12_J24_001_particles.cs"
    raw = np.load(path)
    table = read_cs(path)
    assert len(table) == 2019
    for row in (0, 1, 500, 2018):
        expected = _rodrigues(raw["alignments3D/pose"][row].astype(np.float64)).T  # RELION A = expm([w]x)^T
        angles = table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].iloc[row]
        np.testing.assert_allclose(_relion_matrix(*angles), expected, atol=1e-9)
        assert 0 <= angles["rlnAngleTilt"] <= 180


def test_ctf_shifts_and_image_location(fixtures_dir):
    path = fixtures_dir / "cryosparc_P12_J24_001_particles.cs"
    first = read_cs(path).iloc[0]
    assert first["rlnOriginXAngst"] == pytest.approx(11.334375 * 2.95, rel=1e-6)
    assert first["rlnOriginYAngst"] == pytest.approx(-1.828125 * 2.95, rel=1e-6)
    assert first["rlnDefocusU"] == pytest.approx(45591.37) and first["rlnDefocusV"] == pytest.approx(45309.793)
    assert first["rlnDefocusAngle"] == pytest.approx(np.rad2deg(-1.3636448), rel=1e-6)
    assert (first["rlnVoltage"], first["rlnSphericalAberration"]) == (200.0, 2.0)
    assert first["rlnAmplitudeContrast"] == pytest.approx(0.07)
    assert (first["rlnImageSize"], first["image_index"]) == (180, 0)
    assert first["rlnImagePixelSize"] == pytest.approx(2.95)
    stack = "J19/extract/20150917_05196_DNA-TET-25k-DE20_raw.region_000.sum-all_003-072_particles.mrc"
    assert first["rlnImageName"] == f"000001@{stack}"
    assert first["image_path"] == str(fixtures_dir / stack)
    assert (first["rlnPhaseShift"], first["rlnCtfBfactor"], first["rlnOpticsGroup"]) == (0.0, 0.0, 1)


def test_2d_alignments_give_no_poses(fixtures_dir):
    path = fixtures_dir / "cryosparc_J2_particles_exported.cs"
    table = read_cs(path)
    assert len(table) == 22 and not set(POSE_COLUMNS) & set(table.columns)
    stack = "J1/imported/000090334788266266069_18jam15b_0345_ali_DW.mrcs"
    assert table["rlnImageName"].iloc[0] == f"000001@{stack}"  # leading '>' stripped
    assert table["image_index"].tolist() == np.load(path)["blob/idx"].tolist()
    assert "rlnCtfBfactor" in table.columns and (table["rlnImageSize"] == 300).all()


def test_datadir_finds_stacks_by_bare_file_name(fixtures_dir, tmp_path):
    (tmp_path / "000090334788266266069_18jam15b_0345_ali_DW.mrcs").write_bytes(b"")
    table = read_cs(fixtures_dir / "cryosparc_J2_particles_exported.cs", datadir=tmp_path)
    assert set(table["image_path"]) == {str(tmp_path / "000090334788266266069_18jam15b_0345_ali_DW.mrcs")}


def test_ctf_only_file_and_dispatch(fixtures_dir):
    table = read_particles(fixtures_dir / "empiar_10076_7.cs")
    assert len(table) == 7 and table["image_path"].iloc[0] == str(fixtures_dir / "empiar_10076_7.mrc")
    assert table["rlnDefocusU"].iloc[0] == pytest.approx(15301.1)


def test_missing_field_is_named(fixtures_dir, tmp_path):
    particles = np.load(fixtures_dir / "cryosparc_J2_particles_exported.cs")
    path = tmp_path / "broken.cs"
    with open(path, "wb") as stream:
        np.save(stream, recfunctions.drop_fields(particles, ["ctf/df1_A"], usemask=False))
    with pytest.raises(InputError, match="missing field ctf/df1_A") as error:
        read_cs(path)
    assert "broken.cs" in str(error.value)


def test_euler_angles_round_trip_through_matrices():
    rng = np.random.default_rng(3)
    angles = np.column_stack([rng.uniform(-180, 180, 200), rng.uniform(0, 180, 200), rng.uniform(-180, 180, 200)])
    angles = np.vstack([angles, [[40.0, 0.0, 25.0], [40.0, 180.0, 25.0]]])  # gimbal lock
    matrices = euler_to_matrix(angles)
    np.testing.assert_allclose(matrices[5], _relion_matrix(*angles[5]), atol=1e-12)
    np.testing.assert_allclose(euler_to_matrix(matrix_to_euler(matrices)), matrices, atol=1e-9)
    np.testing.assert_allclose(matrix_to_euler(matrices[:200]), angles[:200], atol=1e-7)
    np.testing.assert_allclose(matrix_to_euler(matrices[200:]), [[0, 0, 65], [0, 180, -15]], atol=1e-9)
