"""The `cryofire` command line: help, one-line errors with exit status 2, and the pipeline through main()."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cryofire.cli import build_parser, main
from cryofire.io import ImageSource, read_particles, read_volume

PIPELINE_COMMANDS = ["simulate", "preprocess", "backproject", "evaluate", "train", "infer"]


def _exit_code(argv: list[str]) -> int:
    """main(argv)'s status, whether it returns or exits (argparse exits for --help)."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def _one_line_error(capsys) -> str:
    """The stderr of a failed command: exactly one line 'cryofire: error: ...', no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line and "img/s]" not in line]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("cryofire: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """A 40-image box-16 dataset (SNR 10) made through the command line."""
    out = tmp_path_factory.mktemp("cli") / "sim"
    argv = ["simulate", "-o", str(out), "-n", "40", "--box", "16", "--seed", "2", "--snr", "10",
            "--images-per-stack", "25"]
    assert main(argv) == 0
    return out


def _registered_commands() -> list[str]:
    subparsers = next(action for action in build_parser()._actions if action.dest == "command")
    return sorted(subparsers.choices)


def test_top_level_help_lists_every_command(capsys):
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    commands = _registered_commands()
    assert set(PIPELINE_COMMANDS) <= set(commands)
    for command in commands:
        assert command in out


def test_every_command_help_exits_zero(capsys):
    for command in _registered_commands():
        assert _exit_code([command, "--help"]) == 0, command
        out = capsys.readouterr().out
        assert out.startswith(f"usage: cryofire {command}"), command
        assert "-h, --help" in out, command


def test_missing_command_is_a_usage_error(capsys):
    assert _exit_code([]) == 2
    assert "usage: cryofire" in capsys.readouterr().err


def test_missing_star_file_is_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "nowhere.star"
    assert main(["preprocess", str(missing), "-o", str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    assert str(missing) in line and "not found" in line


def test_truncated_stack_is_one_line_naming_it(small_dataset, tmp_path, capsys):
    copy = tmp_path / "sim"
    shutil.copytree(small_dataset, copy)
    stack = copy / "stacks" / "particles_0001.mrcs"
    os.truncate(stack, stack.stat().st_size - 100)
    assert main(["preprocess", str(copy / "particles.star"), "-o", str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    assert str(stack) in line and "truncated" in line


@pytest.mark.parametrize("argv, key", [
    (["preprocess", "{star}", "-o", "{tmp}", "--box", "15"], "--box"),
    (["preprocess", "{star}", "-o", "{tmp}", "--box", "64"], "--box"),
    (["simulate", "-o", "{tmp}", "-n", "0"], "n_images"),
    (["simulate", "-o", "{tmp}", "-n", "10", "--state-weights", "1", "1", "1"], "state_weights"),
    (["evaluate", "-o", "{tmp}/m.json"], "nothing to evaluate"),
])
def test_bad_option_values_are_one_line_errors_naming_the_option(argv, key, small_dataset, tmp_path, capsys):
    argv = [a.format(star=small_dataset / "particles.star", tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    assert key in _one_line_error(capsys)


def test_simulate_preprocess_backproject_evaluate(small_dataset, tmp_path, capsys):
    prep, volume, metrics = tmp_path / "prep", tmp_path / "map.mrc", tmp_path / "metrics.json"
    assert main(["preprocess", str(small_dataset / "particles.star"), "-o", str(prep), "--box", "8"]) == 0
    table = read_particles(prep / "particles.star")
    assert ImageSource(table)[np.arange(40)].shape == (40, 8, 8)
    np.testing.assert_array_equal(table["rlnImagePixelSize"], 20.0)

    assert main(["backproject", str(prep / "particles.star"), "-o", str(volume), "--device", "cpu"]) == 0
    assert read_volume(volume)[0].shape == (8, 8, 8) and read_volume(volume)[1] == pytest.approx(20.0)
    half_maps = json.loads(Path(f"{volume}.fsc.json").read_text())
    assert half_maps["nyquist_angstrom"] == pytest.approx(40.0) and len(half_maps["fsc"]) == 4

    capsys.readouterr()
    assert main(["evaluate", "--volume", str(volume), "--true-volume", str(small_dataset / "volumes" / "average.mrc"),
                 "--true-star", str(small_dataset / "particles.star"), "--pred-star", str(prep / "particles.star"),
                 "-o", str(metrics)]) == 0
    result = json.loads(metrics.read_text())
    assert json.loads(capsys.readouterr().out)["n_images"] == 40  # the scalar metrics are printed
    assert len(result["fsc"]["fsc"]) == 4  # the 16-px truth is cropped to the 8-px map
    print("FSC", result["fsc"]["fsc"]); assert result["fsc"]["fsc"][0] > 0.9
    # The preprocessed star carries the true poses through (at another pixel size): zero error.
    assert result["rotation_error_median_deg"] < 1e-3 and result["shift_error_median_px"] < 1e-6
    assert result["mirrored_hand"] is False
