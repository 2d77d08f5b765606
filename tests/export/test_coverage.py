"""The supported-models table cannot lie: every open_clip pretrained pair, exported or refused.

For each (model, tag) of `open_clip.list_pretrained()`, its config is SHRUNK (tests/shrunk_models.py:
the same tower family and options, 2 blocks, width 64, the real patch size and pooling) and built
with random weights. A pair the table calls supported must then export: the closed-form graph equals
the autograd reference (≤ 1e-5), the ONNX graphs equal it and open_clip's text tower (≤ 1e-4 and
1e-5, the export's own verification), and the torch-free runtime loads the folder and explains an
image. A pair called unsupported must be refused by the exporter, its real tower built on the meta
device. Pairs whose shrunk towers are the same to the exporter (spec, canonical tensor shapes, stem:
e.g. ViT-L-14 and ViT-H-14 shrunk) share one export, so the suite stays within CI's minutes.
"""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from shrunk_models import TEXT_CFG, build_shrunk, shrunk_pair_cfg

from legrad_export.graphs import build_image_graph
from legrad_export.layers import resolve_layers
from legrad_export.load import wrap_openclip
from legrad_export.onnx_export import ExportSettings, export_model
from legrad_export.support import pair_support
from legrad_export.towers import canonical_state_dict, describe_tower
from legrad_export.verify import reference
from legrad_runtime import load
from legrad_runtime.errors import UnsupportedModelError
from tiny_models import meta_tower, random_inputs

pytestmark = pytest.mark.torch

PAIRS = [tuple(p) for p in open_clip.list_pretrained()]


def _signature(model: torch.nn.Module, cfg: dict, name: str) -> str:
    """What the exporter sees of a shrunk model: its spec, canonical tensor shapes, stem and top config."""
    spec = describe_tower(model, name)
    shapes = {k: tuple(v.shape) for k, v in sorted(canonical_state_dict(model, spec).items())}
    stem = getattr(getattr(model.visual, "trunk", None), "patch_embed", None)
    rest = {k: v for k, v in cfg.items() if k != "vision_cfg"}
    return "\n".join([repr(spec), json.dumps(shapes), repr(stem), json.dumps(rest, sort_keys=True)])


@pytest.fixture(scope="module")
def groups() -> list[tuple[dict, list[tuple[str, str]]]]:
    """(shrunk config, the pairs it stands for), one per distinct shrunk tower of a supported pair."""
    by_cfg: dict[str, list[tuple[str, str]]] = {}
    for name, tag in PAIRS:
        if pair_support(name, tag).supported:
            by_cfg.setdefault(json.dumps(shrunk_pair_cfg(name, tag), sort_keys=True), []).append((name, tag))
    by_signature: dict[str, tuple[dict, list]] = {}
    for key, pairs in by_cfg.items():
        cfg = json.loads(key)
        signature = _signature(build_shrunk(cfg), cfg, pairs[0][0])
        by_signature.setdefault(signature, (cfg, []))[1].extend(pairs)
    return list(by_signature.values())


@pytest.mark.parametrize("name", sorted({n for n, t in PAIRS if not pair_support(n, t).supported}))
def test_every_pair_called_unsupported_is_refused_by_the_exporter(name):
    with pytest.raises(UnsupportedModelError):
        describe_tower(meta_tower(name), name)


def _check_one(cfg: dict, pairs: list[tuple[str, str]], out) -> None:
    name = pairs[0][0]
    model = build_shrunk(cfg, seed=len(pairs))
    tokenizer = SimpleTokenizer(context_length=TEXT_CFG["context_length"])
    loaded = wrap_openclip(model, name, tokenizer=tokenizer)
    size = loaded.preprocess["size"]
    layers = resolve_layers(-2, loaded.vit.num_layers)

    graph = build_image_graph(loaded, size, layers)
    pixels, text = random_inputs(2, 3, size, loaded.vit.embed_dim, seed=7)
    with torch.no_grad():
        heatmaps, layer_maps, image_embeds = graph(pixels, text)
    empty = getattr(graph, "empty_embed", None)
    ref = reference(loaded, pixels, text, layers, None if empty is None else empty[0])
    scale = float(ref.layer_maps.abs().max())
    assert scale > 0, "a blank reference map"
    assert (layer_maps - ref.layer_maps).abs().max() <= 1e-5 * max(1.0, scale)
    assert (heatmaps - ref.heatmaps).abs().max() <= 1e-5
    assert (image_embeds - ref.image_embeds).abs().max() <= 1e-5

    folder = export_model(loaded, out, ExportSettings())  # verifies ONNX against the reference
    explained = load(folder).explain(np.full((40, 56, 3), 128, np.uint8), ["a photo of a cat", "a dog"])
    assert explained.heatmaps.shape == (1, 2, size, size) and np.isfinite(explained.heatmaps).all()


def test_every_pair_called_supported_exports_verifies_and_runs(groups, tmp_path):
    failures, verified = [], set()
    for i, (cfg, pairs) in enumerate(groups):
        try:
            _check_one(cfg, pairs, tmp_path / str(i))
        except Exception as exc:  # every group is tried; all failures are reported together
            failures.append(f"{pairs[0][0]} (and {len(pairs) - 1} more): {type(exc).__name__}: {exc}"[:400])
        else:
            verified.update(pairs)
    assert not failures, "\n".join(failures)
    supported = {(n, t) for n, t in PAIRS if pair_support(n, t).supported}
    assert verified == supported
    print(f"{len(verified)} of {len(PAIRS)} pairs export, in {len(groups)} distinct shrunk towers")
