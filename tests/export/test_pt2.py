"""`legrad-export --format pt2`: the image graph as a torch.export + AOTInductor package (docs/pt2.md).

AOTInductor compiles C++ (about 30 s for a tiny model on 2 cores), so the default run compiles one
package: the tiny LayerScale CLIP through the CLI with `--format onnx,pt2`, checked against the
autograd reference at several batch sizes and prompt counts (the package's dynamic axes), against
the ONNX graph of the same folder, and for its metadata. The classifier tower and `--format pt2`
alone (the ONNX image graph left out) compile a second package: marked slow.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from legrad_export.cli import build_parser, main
from legrad_export.load import load_openclip
from legrad_export.pt2 import PT2_FILE, PT2_KEY, export_folder, load_pt2, verify_pt2
from legrad_export.reference import legrad_reference
from legrad_runtime.errors import VerificationError
from legrad_runtime.metadata import (
    CLASSIFIER_GRAPH,
    IMAGE_GRAPH,
    METADATA_FILE,
    TEXT_GRAPH,
    read_metadata,
    sha256_file,
)
from tiny_models import build_tiny_torchvision_vit, random_inputs, wrap_tiny_classifier

pytestmark = pytest.mark.torch

VARIANT = "layerscale"  # LayerScale and perturbed LayerNorms: every term of the closed form
SHAPES = [(1, 1), (3, 4), (3, 1), (1, 4)]  # (batch, prompts): both axes at two sizes
ATOL = {spec.name: spec.atol for spec in IMAGE_GRAPH.outputs}  # the ONNX verification's tolerances


@pytest.fixture(scope="module")
def exported(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("pt2")
    source = tiny_dirs[VARIANT]
    assert main(["--model", f"local-dir:{source}", "--format", "onnx,pt2", "--out", str(out)]) == 0
    (folder,) = out.iterdir()
    return load_openclip(str(source)), folder, load_pt2(folder / PT2_FILE)


def _onnx(folder, pixels, text):
    session = ort.InferenceSession(str(folder / IMAGE_GRAPH.filename), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": pixels.numpy(), "text_embeds": text.numpy()})


@pytest.mark.parametrize("batch, prompts", SHAPES)
def test_pt2_outputs_match_the_reference_at_every_batch_and_prompt_count(exported, batch, prompts):
    loaded, folder, runner = exported
    meta = read_metadata(folder)
    pixels, text = random_inputs(batch, prompts, meta.image_size, meta.embed_dim, seed=batch * 10 + prompts)
    heatmaps, layer_maps, image_embeds = runner(pixels, text)
    ref = legrad_reference(loaded.model, pixels, text, meta.layers)
    gh, gw = meta.grid_size
    assert heatmaps.shape == (batch, prompts, *meta.image_size)
    assert layer_maps.shape == (batch, prompts, len(meta.layers), gh, gw)
    assert (heatmaps - ref.heatmaps).abs().max() <= ATOL["heatmaps"]
    assert (layer_maps - ref.layer_maps).abs().max() <= ATOL["layer_maps"]
    assert (image_embeds - ref.image_embeds).abs().max() <= ATOL["image_embeds"]
    assert layer_maps.abs().max() > 0 and heatmaps.min() >= 0 and heatmaps.max() <= 1


def test_pt2_outputs_equal_the_onnx_graph_of_the_same_folder(exported):
    _, folder, runner = exported
    meta = read_metadata(folder)
    pixels, text = random_inputs(2, 3, meta.image_size, meta.embed_dim, seed=5)
    for got, want, spec in zip(runner(pixels, text), _onnx(folder, pixels, text), IMAGE_GRAPH.outputs):
        assert got.shape == want.shape
        assert np.abs(got.numpy() - want).max() <= spec.atol, spec.name


def test_cli_writes_the_package_and_its_metadata(exported):
    _, folder, _ = exported
    meta = read_metadata(folder)
    listed = set(meta.files)
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {METADATA_FILE}
    assert listed == on_disk
    assert {PT2_FILE, IMAGE_GRAPH.filename, TEXT_GRAPH.filename} <= listed
    assert meta.files[PT2_FILE].sha256 == sha256_file(folder / PT2_FILE)
    facts = meta.extra[PT2_KEY]
    assert facts["file"] == PT2_FILE and facts["torch"] == torch.__version__
    assert [i["name"] for i in facts["inputs"]] == IMAGE_GRAPH.input_names
    assert facts["inputs"][0]["shape"] == ["batch", 3, *meta.image_size]
    assert facts["dynamic"] == {"batch": [1, None], "prompts": [1, None]}
    assert facts["prompts"] == "batch" and meta.extra["prompt_loop"] is True  # the ONNX graph loops
    assert set(facts["verification_max_abs_diff"]) == set(IMAGE_GRAPH.output_names)
    assert all(d <= ATOL[name] for name, d in facts["verification_max_abs_diff"].items())
    assert facts["compile_s"] > 0
    sidecar = json.loads((folder / METADATA_FILE).read_text())
    assert sidecar["schema_version"] == meta.schema_version  # no schema change: the facts sit in extra
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_the_runtime_still_loads_a_folder_holding_both_formats(exported):
    from legrad_runtime import load

    _, folder, runner = exported
    model = load(folder, device="cpu")
    meta = read_metadata(folder)
    pixels, text = random_inputs(1, 2, meta.image_size, meta.embed_dim, seed=3)
    assert model.metadata.files.keys() == meta.files.keys()
    assert np.abs(runner(pixels, text)[0].numpy() - _onnx(folder, pixels, text)[0]).max() <= 1e-4


def test_a_package_that_disagrees_with_the_reference_fails_in_one_line(exported, tiny_dirs):
    _, folder, _ = exported
    other = load_openclip(str(tiny_dirs[VARIANT]))
    with torch.no_grad():
        other.model.visual.proj.mul_(-1)  # another model: every map and embedding changes
    with pytest.raises(VerificationError) as info:
        verify_pt2(folder / PT2_FILE, other, read_metadata(folder), None, 0.8)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{PT2_FILE}: ")
    assert "heatmaps: max abs diff" in message


@pytest.mark.parametrize("value", ["onnx2", "pt2,tflite", "", ","])
def test_a_bad_format_is_an_argparse_error(value, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--model", "ViT-B-16", "--format", value])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --format: unknown format" in err and "use onnx, pt2 or onnx,pt2" in err


def test_format_names_parse_in_a_fixed_order():
    parse = build_parser().parse_args
    assert parse(["--model", "m"]).format == ("onnx",)
    assert parse(["--model", "m", "--format", "PT2, onnx"]).format == ("onnx", "pt2")
    assert parse(["--model", "m", "--format", "pt2"]).format == ("pt2",)


def test_pt2_with_fp16_is_refused_before_loading(tiny_dirs, tmp_path, capsys):
    source = tiny_dirs[VARIANT]
    argv = ["--model", f"local-dir:{source}", "--format", "pt2", "--dtype", "fp16", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "--format pt2 writes an fp32 package" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_classifier_exports_as_pt2_alone(tmp_path):
    """The classifier's graph (class ids in, logits out) through `--format pt2` alone: the folder holds
    the package and no ONNX image graph, and the package equals its library's autograd reference."""
    from legrad_export.reference_classifier import legrad_reference_classifier

    loaded = wrap_tiny_classifier(build_tiny_torchvision_vit(10))
    folder = export_folder(loaded, tmp_path, formats=("pt2",))
    meta = read_metadata(folder)
    assert PT2_FILE in meta.files and CLASSIFIER_GRAPH.filename not in meta.files
    assert not (folder / CLASSIFIER_GRAPH.filename).exists()
    assert [i["name"] for i in meta.extra[PT2_KEY]["inputs"]] == CLASSIFIER_GRAPH.input_names
    runner = load_pt2(folder / PT2_FILE)
    for batch, prompts in [(1, 1), (3, 4)]:
        gen = torch.Generator().manual_seed(batch + prompts)
        pixels = torch.randn(batch, 3, *meta.image_size, generator=gen)
        ids = torch.randint(0, 10, (prompts,), generator=gen)
        heatmaps, layer_maps, logits = runner(pixels, ids)
        ref = legrad_reference_classifier(loaded.model, pixels, ids, meta.layers)
        assert (heatmaps - ref.heatmaps).abs().max() <= 1e-4
        assert (layer_maps - ref.layer_maps).abs().max() <= 1e-4
        assert (logits - ref.logits).abs().max() <= 1e-4
