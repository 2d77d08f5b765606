"""Non-square inputs (`--image-size WIDTHxHEIGHT`): every tower family at a (gh, gw) grid.

The positional embedding is resampled to (gh, gw) and a RoPE table is built for that grid. The
oracles are independent of that: the references resample or resize by themselves (timm's
`set_input_size` on a copy of a timm trunk), and open_clip's own `encode_image` of such a resized
copy checks the image embeddings of the timm towers.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from legrad_export.cli import main as export_main
from legrad_export.graphs import build_image_graph, empty_prompt_embed
from legrad_export.layers import resolve_layers
from legrad_export.load import load_openclip
from legrad_export.onnx_export import ExportSettings, export_model
from legrad_export.reference import legrad_reference
from legrad_export.reference_coca import legrad_reference_coca
from legrad_export.reference_siglip import legrad_reference_siglip
from legrad_export.reference_timm import legrad_reference_timm
from legrad_runtime.metadata import IMAGE_GRAPH, METADATA_FILE, parse_size, read_metadata
from tiny_models import (
    assert_each_pair_equals_single,
    encode_at,
    random_inputs,
    save_tiny_coca_model,
    save_tiny_eva_model,
    save_tiny_model_dir,
    save_tiny_pe_core_model,
    save_tiny_siglip_model,
    save_tiny_timm_token_model,
)

pytestmark = pytest.mark.torch

# family → (a tiny model's folder, its reference); each a structural kind of tower
FAMILIES = {
    "clip": (lambda root: save_tiny_model_dir(root, "layerscale"), legrad_reference),  # class token
    "siglip": (lambda root: save_tiny_siglip_model(root, "siglip"), legrad_reference_siglip),  # MAP head
    "pe_core": (save_tiny_pe_core_model, legrad_reference_siglip),  # MAP head, class token, RoPE
    "eva02": (lambda root: save_tiny_eva_model(root, "eva02"), legrad_reference_timm),  # RoPE, SwiGLU
    "vitamin": (lambda root: save_tiny_timm_token_model(root, "vitamin"), legrad_reference_timm),  # conv stem
    "coca": (save_tiny_coca_model, legrad_reference_coca),  # attentional pooler
}
TIMM_TOWERS = ("siglip", "pe_core", "eva02", "vitamin")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = tmp_path_factory.mktemp("non-square")
    return {name: load_openclip(str(save(root))) for name, (save, _) in FAMILIES.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("cells", [(3, 5), (5, 2)], ids=["landscape", "portrait"])
def test_the_graph_equals_the_reference_on_a_non_square_grid(loaded, family, cells):
    model = loaded[family]
    patch = model.vit.patch_size
    size = (cells[0] * patch, cells[1] * patch)
    layers = resolve_layers("-2", model.vit.num_layers)
    graph = build_image_graph(model, size, layers)
    pixels, text = random_inputs(2, 3, size, model.vit.embed_dim, seed=sum(cells))
    with torch.no_grad():
        heatmaps, layer_maps, image_embeds = graph(pixels, text)
    reference = FAMILIES[family][1]
    extra = {"empty_embed": empty_prompt_embed(model)} if model.vit.has_correction else {}
    ref = reference(model.model, pixels, text, "-2", **extra)
    assert heatmaps.shape == (2, 3, *size) and layer_maps.shape == (2, 3, len(layers), *cells)
    assert (layer_maps - ref.layer_maps).abs().max() <= 1e-5
    assert (heatmaps - ref.heatmaps).abs().max() <= 1e-5
    assert (image_embeds - ref.image_embeds).abs().max() <= 1e-5
    assert layer_maps.amax() > 0 and heatmaps.amax() > 0.5  # real maps, not degenerate zeros
    if family in TIMM_TOWERS:  # open_clip itself, on a copy resized by timm
        assert (image_embeds - encode_at(model.model, pixels)).abs().max() <= 1e-5


def test_a_transposed_size_gives_a_different_graph(loaded):
    """(48, 80) and (80, 48) are not confused anywhere: their maps differ and have their own shapes."""
    model, layers = loaded["clip"], (1, 2)
    wide, tall = build_image_graph(model, (48, 80), layers), build_image_graph(model, (80, 48), layers)
    assert wide.vit.grid == (3, 5) and tall.vit.grid == (5, 3)
    assert not torch.equal(wide.vit.pos_embed, tall.vit.pos_embed)


@pytest.mark.parametrize("family", ["clip", "pe_core"])
def test_a_448x336_export_equals_the_reference_under_onnxruntime(loaded, family, tmp_path):
    """The issue's shape, for a class-token tower and a RoPE tower: written, verified, and run again here."""
    model = loaded[family]
    settings = ExportSettings(image_size=parse_size("448x336"), resize_mode="longest")
    folder = export_model(model, tmp_path, settings)
    assert folder.name.endswith("__448x336")
    meta = read_metadata(folder)
    assert meta.image_size == (336, 448) and meta.grid_size == (21, 28) and meta.tower.grid == (21, 28)
    assert meta.preprocess.size == (336, 448) and meta.preprocess.resize_mode == "longest"
    raw = json.loads((folder / METADATA_FILE).read_text())
    assert raw["image_size"] == [336, 448] and raw["schema_version"] == 4

    session = ort.InferenceSession(str(folder / IMAGE_GRAPH.filename), providers=["CPUExecutionProvider"])
    pixels, text = random_inputs(2, 2, (336, 448), model.vit.embed_dim, seed=7)
    heatmaps, layer_maps, image_embeds = session.run(
        None, {"pixel_values": pixels.numpy(), "text_embeds": text.numpy()}
    )
    extra = {"empty_embed": empty_prompt_embed(model)} if model.vit.has_correction else {}
    ref = FAMILIES[family][1](model.model, pixels, text, meta.layers, **extra)
    assert heatmaps.shape == (2, 2, 336, 448) and layer_maps.shape[-2:] == (21, 28)
    np.testing.assert_allclose(heatmaps, ref.heatmaps.numpy(), atol=1e-4)
    np.testing.assert_allclose(layer_maps, ref.layer_maps.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(image_embeds, ref.image_embeds.numpy(), atol=1e-4)


@pytest.mark.parametrize("family", ["clip", "eva02"])
def test_every_batch_and_prompt_count_gives_the_single_pair_maps_off_square(loaded, family, tmp_path):
    model = loaded[family]
    size = (2 * model.vit.patch_size, 4 * model.vit.patch_size)
    folder = export_model(model, tmp_path, ExportSettings(image_size=size))
    session = ort.InferenceSession(str(folder / IMAGE_GRAPH.filename), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 5):
        for prompts in (1, 4):
            pixels, text = random_inputs(batch, prompts, size, model.vit.embed_dim, seed=batch * 10 + prompts)
            assert_each_pair_equals_single(session, pixels, text)


def test_the_cli_takes_width_x_height(tiny_dirs, tmp_path):
    assert (
        export_main(["--model", str(tiny_dirs["b16_like"]), "--image-size", "80x48", "--out", str(tmp_path)])
        == 0
    )
    (folder,) = tmp_path.iterdir()
    assert folder.name.endswith("__80x48")
    meta = read_metadata(folder)
    assert meta.image_size == (48, 80) and meta.grid_size == (3, 5)
    assert meta.extra["verification_max_abs_diff"]["heatmaps"] <= 1e-4


@pytest.mark.parametrize(
    "size, message",
    [
        ("80x", "must be a positive integer (448) or WIDTHxHEIGHT"),
        ("0x48", "must be a positive integer (448) or WIDTHxHEIGHT"),
        ("80x48x3", "must be a positive integer (448) or WIDTHxHEIGHT"),
        ("eighty", "must be a positive integer (448) or WIDTHxHEIGHT"),
    ],
)
def test_a_malformed_size_is_refused_in_one_line_before_torch_loads(tmp_path, size, message):
    code = (
        "import sys; from legrad_export.cli import main; "
        f"main(['--model', 'ViT-B-16', '--image-size', {size!r}, '--out', {str(tmp_path)!r}]); "
        "print('torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "False"
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("legrad-export: error: --image-size") and message in line


def test_a_side_that_is_no_multiple_of_the_patch_is_named(tiny_dirs, tmp_path, capsys):
    code = export_main(
        ["--model", str(tiny_dirs["b16_like"]), "--image-size", "80x40", "--out", str(tmp_path)]
    )
    assert code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "80x40" in line and "side 40 is not a positive multiple" in line and "use e.g. 32 or 48" in line
    assert not any(tmp_path.iterdir())  # nothing written
