"""Our reference and our closed form against the authors' released code on the same weights.

The authors' `legrad_torch` 1.1 pins open_clip ≤ 2.23.0. Both are installed with pip `--target`
into `.authors-site/` (git-ignored) and run in a subprocess with that folder first on PYTHONPATH,
next to this suite's torch. Skipped only if pip cannot reach the package registry.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from legrad_export.graphs import build_image_graph
from legrad_export.layers import resolve_layers
from legrad_export.legrad_map import MapLeGrad
from legrad_export.load import visual_state_dict, wrap_openclip
from legrad_export.reference import legrad_reference
from legrad_export.reference_siglip import legrad_reference_siglip
from legrad_export.vit import ExplicitViT
from tiny_models import random_inputs

pytestmark = [pytest.mark.torch, pytest.mark.slow]  # real-size models, the authors' code in a side folder

HERE = Path(__file__).parent
SITE = HERE.parent.parent / ".authors-site"
PACKAGES = [
    "open_clip_torch==2.23.0",
    "legrad_torch==1.1",
    "einops",
    "opencv-python-headless",
    # matplotlib and what it needs beyond numpy/pillow/packaging (it is imported by legrad.utils)
    "matplotlib",
    "contourpy",
    "cycler",
    "fonttools",
    "kiwisolver",
    "pyparsing",
    "python-dateutil",
    "six",
]


@pytest.fixture(scope="session")
def authors_site() -> Path:
    done = SITE / ".installed"
    if not done.exists():
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(SITE)]
        result = subprocess.run(cmd + PACKAGES, capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot install the authors' code: {result.stderr.strip()[-300:]}")
        done.touch()
    return SITE


def _run_authors(authors_site: Path, tmp_path: Path, job: dict) -> torch.Tensor:
    """The authors' maps for JOB (see authors_legrad.py), run in a subprocess on their open_clip."""
    job_path, out = tmp_path / "job.pt", tmp_path / "out.pt"
    torch.save(job, job_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(authors_site), str(HERE)])}
    run = subprocess.run(
        [sys.executable, str(HERE / "authors_legrad.py"), str(job_path), str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return torch.load(out)


# (open_clip model name, image size, the authors' layer_index)
CASES = [("ViT-B-32-quickgelu", 224, -2), ("ViT-B-16", 448, -2), ("ViT-B-32", 224, 8)]


@pytest.mark.parametrize(("name", "size", "layer_index"), CASES)
def test_maps_equal_the_authors_code(name, size, layer_index, authors_site, tmp_path):
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    pixels, text = random_inputs(2, 3, size, model.visual.proj.shape[1], seed=5)
    job = {"model_name": name, "weights": str(weights), "pixel_values": pixels, "text_embeds": text}
    theirs = _run_authors(authors_site, tmp_path, job | {"layer_index": layer_index})

    ref = legrad_reference(model, pixels, text, layer_index)
    loaded = wrap_openclip(model, name, tokenizer=object())
    with torch.no_grad():
        ours, _, _ = build_image_graph(loaded, size, resolve_layers(layer_index, loaded.vit.num_layers))(
            pixels, text
        )
    assert theirs.shape == ref.heatmaps.shape == (2, 3, size, size)
    span = theirs.flatten(2).amax(-1) - theirs.flatten(2).amin(-1)
    assert torch.isfinite(theirs).all() and torch.allclose(span, torch.ones_like(span))  # real, min-max maps
    assert (ref.heatmaps - theirs).abs().max() <= 1e-5
    assert (ours - theirs).abs().max() <= 1e-5


# (image size, layer_index, correction): ViT-B-16-SigLIP (native 224), random weights
SIGLIP_CASES = [(224, -2, True), (224, -2, False), (224, 8, True), (384, -2, True)]


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-SigLIP").eval()
    weights = tmp_path_factory.mktemp("siglip") / "weights.pt"
    torch.save(model.state_dict(), weights)
    return model, weights


@pytest.mark.parametrize(("size", "layer_index", "correction"), SIGLIP_CASES)
def test_siglip_reference_equals_the_authors_code(
    siglip, size, layer_index, correction, authors_site, tmp_path
):
    model, weights = siglip
    pixels, text = random_inputs(2, 3, size, 768, seed=7)
    empty = torch.nn.functional.normalize(torch.randn(768, generator=torch.Generator().manual_seed(8)), dim=0)
    job = {
        "model_name": "ViT-B-16-SigLIP",
        "weights": str(weights),
        "pixel_values": pixels,
        "text_embeds": text,
    }
    theirs = _run_authors(
        authors_site,
        tmp_path,
        job | {"layer_index": layer_index, "empty_embed": empty if correction else None},
    )
    ref = legrad_reference_siglip(model, pixels, text, layer_index, empty if correction else None)
    assert theirs.shape == ref.heatmaps.shape == (2, 3, size, size)
    assert torch.isfinite(theirs).all() and theirs.amax() > 0.9  # real maps, not blank ones
    diff = (ref.heatmaps - theirs).abs().max()
    print(f"SigLIP {size} px, layer_index={layer_index}, correction={correction}: max diff {diff:.2e}")
    assert diff <= 1e-5
    # and our closed-form graph, built from the same (untouched) model
    loaded = wrap_openclip(model, "ViT-B-16-SigLIP", tokenizer=_no_tokenizer)
    vit = ExplicitViT(loaded.vit, visual_state_dict(loaded, size), size)
    graph = MapLeGrad(vit, resolve_layers(layer_index, 12), empty if correction else None).eval()
    with torch.no_grad():
        ours = graph(pixels, text)[0]
    graph_diff = (ours - theirs).abs().max()
    print(f"  our graph: max diff {graph_diff:.2e}")
    assert graph_diff <= 1e-5


def _no_tokenizer(texts):
    raise AssertionError("the parity run embeds no text")


# (image size, layer_index): a tiny CoCa (tiny_models.COCA_CFG), registered under a name on their side
COCA_CASES = [(64, -2), (64, 0)]


@pytest.mark.parametrize(("size", "layer_index"), COCA_CASES)
def test_coca_maps_equal_the_authors_code_image_by_image(size, layer_index, authors_site, tmp_path):
    """Their compute_legrad_coca takes one image and sums its prompts; ours is every pair at once."""
    from legrad_export.reference_coca import legrad_reference_coca
    from tiny_models import COCA_CFG, build_tiny_coca

    model = build_tiny_coca(seed=4)
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    pixels, text = random_inputs(3, 2, size, COCA_CFG["embed_dim"], seed=6)
    job = {"model_name": "legrad-tiny-coca", "model_cfg": COCA_CFG, "weights": str(weights)}
    job |= {"pixel_values": pixels, "text_embeds": text, "layer_index": layer_index}
    theirs = _run_authors(authors_site, tmp_path, job)
    ref = legrad_reference_coca(model, pixels, text, layer_index)
    loaded = wrap_openclip(model, "legrad-tiny-coca", tokenizer=_no_tokenizer)
    with torch.no_grad():
        ours = build_image_graph(loaded, size, resolve_layers(layer_index, 3))(pixels, text)[0]
    assert theirs.shape == ours.shape == (3, 2, size, size)
    span = theirs.flatten(2).amax(-1) - theirs.flatten(2).amin(-1)
    assert torch.isfinite(theirs).all() and torch.allclose(span, torch.ones_like(span))  # real, min-max maps
    diff, graph_diff = (ref.heatmaps - theirs).abs().max(), (ours - theirs).abs().max()
    print(f"CoCa {size} px, layer_index={layer_index}: reference {diff:.2e}, our graph {graph_diff:.2e}")
    assert diff <= 1e-5 and graph_diff <= 1e-5
