"""RELION STAR files: RELION 3.0/3.1/5 fixtures into the particle table, write_star round trips, bad input."""

import numpy as np
import pandas as pd
import pytest

from cryofire.errors import InputError
from cryofire.io import read_particles, read_star, write_star

OPTICS = ["rlnOpticsGroup", "rlnImagePixelSize", "rlnImageSize", "rlnVoltage", "rlnSphericalAberration",
          "rlnAmplitudeContrast"]
PARTICLES_31 = ["rlnImageName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnOpticsGroup"]
PARTICLES_30 = ["rlnImageName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
                "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize"]


def _write_star(path, blocks):
    """A STAR file from {block name: (columns, rows)}."""
    lines = []
    for name, (columns, rows) in blocks.items():
        lines += [f"data_{name}", "", "loop_", *(f"_{column}" for column in columns)]
        lines += [" ".join(str(value) for value in row) for row in rows] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


def _relion30_row(name, defocus_u=15000.0):
    return [name, defocus_u, 14000.0, 30.0, 300, 2.7, 0.1, 1.5, 64]


def test_relion30_with_datadir(fixtures_dir):
    table = read_star(fixtures_dir / "empiar_10076_7.star", datadir=fixtures_dir)
    assert len(table) == 7
    np.testing.assert_allclose(table["rlnImagePixelSize"], 5 * 1e4 / 38168)  # DetectorPixelSize, Magnification
    assert (table["rlnImageSize"] == 320).all()  # from the stack header: the star does not say
    assert table["image_index"].tolist() == list(range(7))
    assert set(table["image_path"]) == {str(fixtures_dir / "empiar_10076_7.mrc")}
    assert table["rlnDefocusU"].iloc[2] == 15150.7 and table["rlnDefocusV"].iloc[2] == 14766.0
    assert (table["rlnPhaseShift"] == 0).all() and (table["rlnCtfBfactor"] == 0).all()
    assert (table["rlnOpticsGroup"] == 1).all() and table["rlnOpticsGroup"].dtype == np.int64


def test_relion31_optics_merged(fixtures_dir):
    table = read_star(fixtures_dir / "relion31.star")
    assert len(table) == 5
    first = table.iloc[0]
    assert (first["rlnImagePixelSize"], first["rlnImageSize"], first["rlnVoltage"]) == (2.806, 256, 300.0)
    assert (first["rlnSphericalAberration"], first["rlnAmplitudeContrast"]) == (0.01, 0.1)
    assert (first["rlnOriginXAngst"], first["rlnOriginYAngst"]) == (0.019324, -0.64686)
    assert first["rlnAngleRot"] == -102.30296 and first["rlnDefocusU"] == 13108.082418
    assert first["image_path"] == str(fixtures_dir / "relion31.mrcs") and first["image_index"] == 0
    assert (table["rlnCtfBfactor"] == 0).all()
    assert first["rlnImageOriginalName"].startswith("000001@Extract/job133/")  # other columns carried through


def test_relion31_column_order_does_not_matter(fixtures_dir):
    table = read_star(fixtures_dir / "relion31.star")
    other = read_star(fixtures_dir / "relion31.v2.star")
    pd.testing.assert_frame_equal(table, other[table.columns])


@pytest.mark.parametrize(("row", "group", "pixel_size", "cs", "name"), [
    (0, 6, 1.25, 2.7, "opticsGroup6"),
    (24, 5, 1.24, 2.7, "opticsGroup4"),
    (50, 2, 1.24, 2.7, "opticsGroup3"),
    (79, 1, 1.25, 2.7, "opticsGroup5"),
    (127, 3, 1.25, 2.7, "opticsGroup2"),
    (138, 4, 1.25, 2.6, "opticsGroup1"),
])
def test_relion31_six_optics_groups(fixtures_dir, row, group, pixel_size, cs, name):
    # expected values read by hand from data_optics of the file
    table = read_star(fixtures_dir / "relion31.6opticsgroups.star")
    assert len(table) == 139
    particle = table.iloc[row]
    assert particle["rlnOpticsGroup"] == group and particle["rlnOpticsGroupName"] == name
    assert (particle["rlnImagePixelSize"], particle["rlnSphericalAberration"]) == (pixel_size, cs)
    assert (particle["rlnVoltage"], particle["rlnImageSize"]) == (200.0, 196)


def test_relion31_six_optics_groups_keep_particle_values(fixtures_dir):
    first = read_star(fixtures_dir / "relion31.6opticsgroups.star").iloc[0]
    assert (first["rlnDefocusU"], first["rlnDefocusV"], first["rlnDefocusAngle"]) == (10352.805929, 8905.919375,
                                                                                     60.88937)
    assert first["image_index"] == 2  # "3@Polish/..."; the stack is absent, which reading metadata allows
    assert first["image_path"] == str(fixtures_dir / "Polish/job520/Micrographs/0003_shiny.mrcs")
    assert first["rlnMicrographPixelSize"] == 1.035


def test_relion5_with_datadir(fixtures_dir):
    table = read_star(fixtures_dir / "relion5.star", datadir=fixtures_dir / "toy_datadir")
    assert len(table) == 17
    assert (table["rlnVoltage"] == 100.0).all() and (table["rlnImagePixelSize"] == 0.89).all()
    assert table["image_path"].iloc[1] == str(fixtures_dir / "toy_datadir" / "toy_images_b.mrcs")
    assert table["image_index"].iloc[:3].tolist() == [0, 1, 2]
    assert table["rlnOddZernike"].iloc[0].startswith("[0.068048")


def test_toy_projections_take_pixel_size_from_the_stack(fixtures_dir):
    with pytest.warns(UserWarning, match="no pixel size in the STAR file"):
        table = read_star(fixtures_dir / "toy_projections.star")
    assert len(table) == 1000 and (table["rlnImagePixelSize"] == 1.0).all() and (table["rlnImageSize"] == 30).all()
    assert (table["rlnPhaseShift"] == 90).all() and table["dummyVariable"].iloc[12] == 42


def test_relion30_origins_in_pixels_become_angstrom(tmp_path):
    columns = [*PARTICLES_30[:-2], "rlnDetectorPixelSize", "rlnMagnification", "rlnOriginX", "rlnOriginY"]
    rows = [["1@s.mrcs", 15000.0, 14000.0, 30.0, 300, 2.7, 0.1, 1.035, 10000, -0.14063, 2.5]]
    with pytest.warns(UserWarning, match="image size stays unknown"):  # s.mrcs does not exist
        table = read_star(_write_star(tmp_path / "p.star", {"": (columns, rows)}))
    assert table["rlnImagePixelSize"].iloc[0] == pytest.approx(1.035)
    assert table["rlnOriginXAngst"].iloc[0] == pytest.approx(-0.14063 * 1.035)
    assert table["rlnOriginYAngst"].iloc[0] == pytest.approx(2.5 * 1.035)
    assert "rlnOriginX" not in table.columns and table["rlnImageSize"].isna().all()
    with pytest.raises(ValueError, match="rlnImageSize is unknown"):
        write_star(tmp_path / "out.star", table)


def _compare_tables(table, reread):
    columns = [column for column in table.columns if column != "rlnImageName"]
    pd.testing.assert_frame_equal(table[columns], reread[columns], check_dtype=False, rtol=1e-10)


@pytest.mark.parametrize("name", ["relion31.6opticsgroups.star", "relion31.star", "empiar_10076_7.star"])
def test_write_star_round_trip(fixtures_dir, tmp_path, name):
    table = read_star(fixtures_dir / name)
    write_star(tmp_path / "out.star", table)
    text = (tmp_path / "out.star").read_text()
    assert text.startswith("# version 30001") and "data_optics" in text and "_rlnCtfBfactor" in text
    assert "image_path" not in text
    reread = read_star(tmp_path / "out.star", allow_absolute_paths=True)  # the stacks lie outside tmp_path
    _compare_tables(table, reread)


def test_write_star_one_optics_row_per_group_and_relative_names(tmp_path):
    (tmp_path / "stacks").mkdir()
    rows = [[f"{i + 1}@stacks/a.mrcs", 15000.0 + i, 14000.0, 30.0, 1 + i % 2] for i in range(4)]
    optics = [[1, 1.5, 64, 200, 2.7, 0.1], [2, 1.5, 64, 300, 2.7, 0.1]]
    table = read_star(_write_star(tmp_path / "in.star", {"optics": (OPTICS, optics),
                                                         "particles": (PARTICLES_31, rows)}))
    table["rlnMicrographName"] = ["with space.mrc", "", "b.mrc", "c.mrc"]  # written quoted
    write_star(tmp_path / "out.star", table)
    reread = read_star(tmp_path / "out.star")
    assert reread["rlnImageName"].tolist() == [f"{i + 1:06d}@stacks/a.mrcs" for i in range(4)]
    assert reread["rlnVoltage"].tolist() == [200.0, 300.0, 200.0, 300.0]
    _compare_tables(table, reread)
    assert (tmp_path / "out.star").read_text().count("opticsGroup") == 2


def test_missing_column_is_named(fixtures_dir, tmp_path):
    columns = [column for column in PARTICLES_30 if column != "rlnDefocusV"]
    rows = [[value for column, value in zip(PARTICLES_30, _relion30_row("1@s.mrcs")) if column != "rlnDefocusV"]]
    path = _write_star(tmp_path / "p.star", {"": (columns, rows)})
    with pytest.raises(InputError, match="has no column rlnDefocusV") as error:
        read_star(path)
    assert str(path) in str(error.value)
    with pytest.raises(InputError, match="rlnAmplitudeContrast"):  # a real RELION 3.0 refinement file
        read_star(fixtures_dir / "FinalRefinement-OriginalParticles-PfCRT.star")


def test_non_numeric_defocus_names_column_and_row(tmp_path):
    rows = [_relion30_row("1@s.mrcs"), _relion30_row("2@s.mrcs", defocus_u="12x00"), _relion30_row("3@s.mrcs")]
    with pytest.raises(InputError, match=r"column rlnDefocusU: data_ row 2 holds '12x00', not a finite number"):
        read_star(_write_star(tmp_path / "p.star", {"": (PARTICLES_30, rows)}))


def test_unknown_optics_group_is_named(tmp_path):
    optics = [[1, 1.5, 64, 300, 2.7, 0.1]]
    rows = [["1@s.mrcs", 15000.0, 14000.0, 30.0, 1], ["2@s.mrcs", 15000.0, 14000.0, 30.0, 7]]
    path = _write_star(tmp_path / "p.star", {"optics": (OPTICS, optics), "particles": (PARTICLES_31, rows)})
    with pytest.raises(InputError, match=r"row 2 uses optics group 7, which data_optics does not define"):
        read_star(path)


@pytest.mark.parametrize("image_name", ["1@/data/elsewhere/s.mrcs", "1@../outside/s.mrcs"])
def test_image_paths_must_stay_inside_the_folder(tmp_path, image_name):
    path = _write_star(tmp_path / "p.star", {"": (PARTICLES_30, [_relion30_row(image_name)])})
    with pytest.raises(InputError, match="allow_absolute_paths=True"):
        read_star(path)
    table = read_star(path, allow_absolute_paths=True)
    assert table["image_path"].iloc[0].endswith("s.mrcs")


def test_datadir_also_finds_stacks_by_bare_file_name(tmp_path):
    (tmp_path / "stacks").mkdir()
    (tmp_path / "stacks" / "s.mrcs").write_bytes(b"")
    path = _write_star(tmp_path / "p.star", {"": (PARTICLES_30, [_relion30_row("1@Extract/job007/s.mrcs")])})
    table = read_star(path, datadir=tmp_path / "stacks")
    assert table["image_path"].iloc[0] == str(tmp_path / "stacks" / "s.mrcs")


@pytest.mark.parametrize("image_name", ["0@s.mrcs", "x@s.mrcs", "1@"])
def test_malformed_image_names(tmp_path, image_name):
    path = _write_star(tmp_path / "p.star", {"": (PARTICLES_30, [_relion30_row(image_name)])})
    with pytest.raises(InputError, match="rlnImageName: data_ row 1"):
        read_star(path)


def test_read_particles_dispatch(fixtures_dir, tmp_path):
    assert len(read_particles(fixtures_dir / "relion31.star")) == 5
    (tmp_path / "p.txt").write_text("")
    with pytest.raises(InputError, match="unknown particle file type '.txt'"):
        read_particles(tmp_path / "p.txt")
    with pytest.raises(InputError, match="file not found"):
        read_particles(tmp_path / "absent.star")
