"""Overlay panels: one strip per (sample, k), colours follow the map, existing panels are kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from patch_quality import layout
from patch_quality.store import hash_data_images, save_quality_maps
from patch_quality.visualize import CAPTION_HEIGHT, main, quality_colors, visualize


def test_quality_colors_red_bad_green_good():
    colors = quality_colors(torch.tensor([[0.0, 0.5, 1.0]]))
    assert colors[0, 0].tolist() == [255, 0, 0]
    assert colors[0, 1].tolist() == [255, 255, 0]
    assert colors[0, 2].tolist() == [0, 255, 0]


def test_panels_follow_the_maps_and_resume(tmp_path):
    data = tmp_path / "DATA"
    folder = layout.sample_dir(data, 0)
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), "white").save(layout.reference_path(folder, "a mug"))
    Image.new("RGB", (64, 64), "white").save(layout.generated_path(folder, "a mug", 0))
    reference_map = torch.ones(8, 8)
    generated_map = torch.ones(8, 8)
    generated_map[:, :4] = 0.0  # left half bad
    maps = {("sample0", 0): (reference_map, generated_map)}
    save_quality_maps(data / "patch_quality.safetensors", maps, {"signed": "false"}, hash_data_images(data, maps))

    out = tmp_path / "viz"
    written = visualize(data, out, size=32, alpha=1.0)
    assert [p.name for p in written] == ["sample0_gen_0.png"]
    panel = np.asarray(Image.open(written[0]))
    assert panel.shape == (32 + CAPTION_HEIGHT, 4 * 32, 3)
    tiles = [panel[CAPTION_HEIGHT:, i * 32 : (i + 1) * 32] for i in range(4)]
    assert (tiles[1] == [0, 255, 0]).all()  # reference fully reproduced
    assert (tiles[3][:, :16] == [255, 0, 0]).all() and (tiles[3][:, 16:] == [0, 255, 0]).all()
    assert visualize(data, out, size=32) == []  # already drawn
    assert len(visualize(data, out, size=32, overwrite=True)) == 1


def test_cli_missing_maps_is_one_line(tmp_path, capsys):
    (tmp_path / "sample0").mkdir()
    with pytest.raises(SystemExit) as info:
        main(["--data_root", str(tmp_path), "--output_dir", str(tmp_path / "viz")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "quality-map file not found" in err and err.count("\n") == 1
