"""`cryofire report`: one self-contained page, embedded PNGs, units, escaping, missing inputs, the ChimeraX script."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cryofire.analysis import analyze_run
from cryofire.cli import main
from cryofire.io import write_star, write_volume
from cryofire.report import write_report
from cryofire.report.inputs import events

HOSTILE = "<script>alert(1)</script>"
N_PARTICLES = 240
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _particle_table(folder: Path, n: int, seed: int = 0) -> pd.DataFrame:
    """A particle table of two optics groups with random poses and CTF (the stack need not exist)."""
    rng = np.random.default_rng(seed)
    group = np.where(np.arange(n) < n // 3, 1, 2)
    defocus_u = rng.uniform(1.0e4, 2.5e4, n)
    return pd.DataFrame({
        "image_path": str(folder / "stack.mrcs"), "image_index": np.arange(n), "rlnImageSize": 16,
        "rlnImagePixelSize": 5.0, "rlnVoltage": np.where(group == 1, 300.0, 200.0), "rlnSphericalAberration": 2.7,
        "rlnAmplitudeContrast": 0.1, "rlnOpticsGroup": group,
        "rlnOpticsGroupName": np.where(group == 1, HOSTILE, "second"),
        "rlnDefocusU": defocus_u, "rlnDefocusV": defocus_u - 150.0, "rlnDefocusAngle": 10.0,
        "rlnAngleRot": rng.uniform(-180, 180, n), "rlnAngleTilt": np.rad2deg(np.arccos(rng.uniform(-1, 1, n))),
        "rlnAnglePsi": rng.uniform(-180, 180, n), "rlnOriginXAngst": 0.0, "rlnOriginYAngst": 0.0,
    })


def _log_records() -> list[dict]:
    records, seen = [], 0
    for epoch in range(3):
        for _ in range(4):
            seen += 50
            records.append({"event": "step", "epoch": epoch, "images_seen": seen, "loss": 1.0 / seen ** 0.3,
                            "images_per_s": 120.0, "learning_rate": 1e-4, "radius_px": 3 + seen / 100,
                            "wall_time": 1.7e9 + seen})
        records.append({"event": "epoch", "epoch": epoch + 1, "images_seen": seen, "train_loss": 1.0 / seen ** 0.3,
                        "epoch_seconds": 12.5, "radius_px": 3 + seen / 100, "val_loss": 1.1 / seen ** 0.3,
                        "rotation_error_median_deg": 40.0 / (epoch + 1), "shift_error_median_px": 1.5,
                        "wall_time": 1.7e9 + seen})
    return records


def _blob_volume(offset: float, size: int = 16) -> np.ndarray:
    """Two Gaussian blobs, the second moved by `offset` px along x."""
    z, y, x = np.mgrid[:size, :size, :size] - size // 2
    blob = lambda cz, cy, cx, s: np.exp(-((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) / (2 * s ** 2))  # noqa
    return (blob(0, 0, -2, 2.0) + 0.7 * blob(1, 2, 2 + offset, 1.5)).astype(np.float32)


def _write_volumes(folder: Path) -> None:
    folder.mkdir()
    entries = [{"file": f"cluster_{i}.mrc", "kind": "cluster", "cluster": i, "z": [float(i), 0.0]} for i in range(2)]
    entries += [{"file": f"pc1_{j}.mrc", "kind": "pc", "pc": 1, "percentile": p, "z": [p / 50, 0.0]}
                for j, p in enumerate([5.0, 35.0, 65.0, 95.0])]
    for entry in entries:
        write_volume(folder / entry["file"], _blob_volume(entry["z"][0]), 5.0)
    (folder / "volumes.json").write_text(json.dumps({"voxel_size_angstrom": 5.0, "volumes": entries}))


def _metrics() -> dict:
    frequency = np.linspace(0, 0.1, 9).tolist()
    return {"rotation_error_median_deg": 3.25, "shift_error_median_px": 0.41, "mirrored_hand": True,
            "confusion_rate": 0.05, "classes": {"confusion_rate": 0.05, "matrix": [[110, 6], [6, 118]],
                                                "predicted_classes": [0, 1], "true_classes": [1, 2]},
            "fsc": {"frequency_per_angstrom": frequency, "fsc": np.cos(np.array(frequency) * 15).tolist(),
                    "resolution_fsc0.5_angstrom": 14.2, "resolution_fsc0.143_angstrom": 11.0}}


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A complete fake run: config, log, poses, 2D latents, a real analysis, volumes; plus prep data, metrics."""
    root = tmp_path_factory.mktemp("report")
    prep = root / "prep"
    prep.mkdir()
    table = _particle_table(prep, N_PARTICLES)
    write_star(prep / "particles.star", table.drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]))
    (prep / "particles_stacks.json").write_text(json.dumps({"fingerprint": {
        "input": str(root / "raw.star"), "config": {"box_size": 16, "normalize": "background", "invert": False}}}))
    write_star(root / "raw.star", table.assign(rlnImageSize=64, rlnImagePixelSize=1.25))
    run = root / "run"
    run.mkdir()
    config = {"data": {"particles": str(prep / "particles.star"), "n_images": N_PARTICLES, "n_train": 216,
                       "n_val": 24, "box_size": 16, "pixel_size_angstrom": 5.0},
              "train": {"epochs": 3, "batch_size": 32}, "model": {"zdim": 2},
              "command": ["cryofire", "train", str(prep / "particles.star"), "--note", HOSTILE],
              "versions": {"python": "3.11", "cryofire": "0.1.0"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _log_records()) + '{"event": "ste')
    write_star(run / "poses.star", table)
    rng = np.random.default_rng(1)
    centres = np.where(np.arange(N_PARTICLES)[:, None] % 2 == 0, [[-2.0, 0.0]], [[2.0, 0.5]])
    np.save(run / "latents.npy", (centres + rng.normal(0, 0.4, (N_PARTICLES, 2))).astype(np.float32))
    analyze_run(run, k=2, max_states=3)
    _write_volumes(run / "volumes")
    (root / "metrics_$a_$.json").write_text(json.dumps(_metrics()))  # bad mathtext if not escaped
    return run


@pytest.fixture(scope="module")
def report(run_folder) -> Path:
    out = run_folder.parent / "report" / "report.html"
    write_report(run_folder, out, metrics=[run_folder.parent / "metrics_$a_$.json"], title=HOSTILE)
    return out


class _Elements(HTMLParser):
    """The img sources, link targets and tags of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images, self.links, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "a":
            self.links.append(attrs.get("href", ""))


def _parse(path: Path) -> _Elements:
    elements = _Elements()
    elements.feed(path.read_text(encoding="utf-8"))
    return elements


def test_report_is_one_self_contained_file(report):
    text = report.read_text(encoding="utf-8")
    assert sorted(p.name for p in report.parent.iterdir()) == ["report.cxc", "report.html"]
    assert not re.search(r"https?://", text)
    elements = _parse(report)
    assert not {"script", "link", "iframe", "object", "embed"} & set(elements.tags)
    assert "style" in elements.tags


def test_every_image_is_an_embedded_png(report):
    images = _parse(report).images
    assert len(images) >= 8  # training, directions, embedding, clusters, 2 volumes, 1 trajectory, FSC
    for source in images:
        prefix = "data:image/png;base64,"
        assert source.startswith(prefix)
        data = base64.b64decode(source[len(prefix):], validate=True)
        assert data.startswith(PNG_SIGNATURE) and len(data) > 2000


def test_links_are_relative_and_point_at_files(report, run_folder):
    files = [link for link in _parse(report).links if not link.startswith("#")]
    assert any(link.endswith("cluster_0.mrc") for link in files)
    assert any(link.endswith("cluster_1.star") for link in files)
    for link in files:
        assert not link.startswith("/") and (report.parent / link).is_file(), link


def _row(text: str, label: str) -> str:
    """The value cell of the key-value row `label` (first match)."""
    match = re.search(rf"<th>{re.escape(label)}</th><td>(.*?)</td>", text)
    assert match, label
    return match.group(1)


@pytest.mark.parametrize(("label", "unit"), [
    ("pixel size", "Å"), ("box size", "px"), ("Nyquist resolution", "Å"), ("final mask radius", "px"),
    ("throughput, median", "images/s"), ("rotation error, median (after global alignment)", "°"),
    ("shift error, median", "px"), ("class confusion (particles misassigned)", "%"),
    ("resolution at FSC = 0.5", "Å"), ("voxel size", "Å"),
])
def test_numbers_carry_units(report, label, unit):
    value = _row(report.read_text(encoding="utf-8"), label)
    assert re.search(r"\d", value) and value.endswith(unit), value


def test_optics_table_has_ctf_ranges_with_units(report):
    text = report.read_text(encoding="utf-8")
    optics = text[text.index("Optics groups"):text.index("</table>", text.index("Optics groups"))]
    for unit in ("µm", "kV", "mm", "Å"):
        assert unit in optics
    assert "300\u00a0kV" in optics and "200\u00a0kV" in optics
    assert "5 %" not in text and _row(text, "class confusion (particles misassigned)") == "5\u00a0%"


def test_preprocessing_is_read_from_the_stack_manifest(report):
    text = report.read_text(encoding="utf-8")
    assert "64\u00a0px → 16\u00a0px" in text and "1.25\u00a0Å → 5\u00a0Å" in text
    assert _row(text, "normalisation") == "background"


def test_user_strings_are_escaped(report):
    text = report.read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    assert text.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3  # title, optics group name, command line


def test_chimerax_script_opens_the_state_volumes(report):
    script = report.with_suffix(".cxc").read_text()
    assert re.findall(r'^open "(.+)"$', script, flags=re.M) == ["../run/volumes/cluster_0.mrc",
                                                                "../run/volumes/cluster_1.mrc"]
    assert re.search(r"^volume #2 style surface level [-\d.e]+ color #[0-9a-f]{6}$", script, flags=re.M)
    assert script.rstrip().endswith("tile\nview")


def test_an_empty_run_folder_still_gives_a_report(tmp_path):
    (tmp_path / "run").mkdir()
    page, script = write_report(tmp_path / "run", tmp_path / "r.html")
    text = page.read_text(encoding="utf-8")
    assert text.count("not available") >= 8
    assert "config.yaml: not found" in text and "latents.npy: not found" in text
    assert "open " not in script.read_text()


def test_missing_analysis_falls_back_to_pca(run_folder, tmp_path):
    page, _ = write_report(run_folder, tmp_path / "r.html", analysis_dir=tmp_path / "none",
                           volume_dirs=[tmp_path / "none"])
    text = page.read_text(encoding="utf-8")
    assert "Latent analysis (cryofire analyze): not available" in text
    assert "first two principal components" in text and "Particles per cluster" not in text
    assert len(_parse(page).images) == 3  # training, directions, embedding (no volumes, metrics given)


def test_cli_report_and_its_errors(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "r.html"), "--metrics", "none.json"]) == 0
    assert (tmp_path / "r.cxc").is_file() and "none.json: not found" in (tmp_path / "r.html").read_text()
    assert main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "r.pdf")]) == 2
    assert main(["report", str(tmp_path / "nothing"), "-o", str(tmp_path / "r.html")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("cryofire: error: ") for line in errors)


def _images_loaded_in_chromium(page: Path, tmp_path: Path) -> tuple[int, int]:
    """(images decoded, images) of `page` in headless Chromium: a copy gets a script that counts them."""
    probe = tmp_path / "probe.html"
    checker = ("<script>window.addEventListener('load', () => { const all = [...document.images]; "
               "document.title = 'LOADED ' + all.filter(i => i.complete && i.naturalWidth > 0).length + "
               "' OF ' + all.length; });</script>")
    text = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page.read_text(encoding="utf-8"))
    probe.write_text(text.replace("</body>", checker + "</body>"), encoding="utf-8")
    command = [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    loaded, total = re.search(r"<title>LOADED (\d+) OF (\d+)</title>", dom).groups()
    return int(loaded), int(total)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")
def test_every_image_renders_in_chromium(report, tmp_path):
    loaded, total = _images_loaded_in_chromium(report, tmp_path)
    assert total >= 8 and loaded == total
    broken = tmp_path / "broken.html"
    broken.write_text(report.read_text(encoding="utf-8").replace("base64,iVBOR", "base64,AAAA", 1), encoding="utf-8")
    assert _images_loaded_in_chromium(broken, tmp_path) == (total - 1, total)  # the check can fail


def test_unreadable_or_unquotable_volumes_are_left_out(run_folder, tmp_path):
    folder = tmp_path / "volumes"
    folder.mkdir()
    write_volume(folder / "a;b.mrc", _blob_volume(0.0), 5.0)
    entries = [{"file": "a;b.mrc", "kind": "cluster", "cluster": 0}, {"file": "gone.mrc", "kind": "cluster"},
               {"file": "pc2_0.mrc", "kind": "pc", "pc": 2}]
    (folder / "volumes.json").write_text(json.dumps({"volumes": entries}))
    page, script = write_report(run_folder, tmp_path / "r.html", volume_dirs=[folder])
    text = page.read_text(encoding="utf-8")
    assert "This volume: not available" in text and "This trajectory: not available" in text
    assert "open " not in script.read_text() and script.read_text().count("# left out volume") == 2


def test_a_resumed_run_logs_each_point_once():
    log = [{"event": "step", "images_seen": 10, "loss": 3.0}, {"event": "step", "images_seen": 20, "loss": 2.0},
           {"event": "epoch", "images_seen": 20}, {"event": "step", "images_seen": 20, "loss": 1.5}]
    assert [r["loss"] for r in events(log, "step")] == [3.0, 1.5]
