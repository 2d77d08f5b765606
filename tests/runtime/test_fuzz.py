"""Property tests: random bytes as images, random edits to legrad.json. Torch-free.

The only outcomes allowed are a result or a LegradError: never another exception, never a hang
(hypothesis' deadline bounds each case).
"""

from __future__ import annotations

import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from legrad_runtime import LegradError, load
from legrad_runtime.metadata import METADATA_FILE
from legrad_runtime.preprocess import load_image


def _encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((24, 32, 3)) * 255).astype(np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


REAL = {fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")}

# random bytes, and real files with random damage: a cut, flipped bytes, random tails
image_bytes = st.one_of(
    st.binary(max_size=2048),
    st.builds(
        lambda data, cut, flips, tail: _damage(data, cut, flips) + tail,
        st.sampled_from(list(REAL.values())),
        st.floats(0.05, 1.0),
        st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8),
        st.binary(max_size=64),
    ),
)


def _damage(data: bytes, cut: float, flips: list[tuple[float, int]]) -> bytes:
    out = bytearray(data[: max(1, int(len(data) * cut))])
    for where, value in flips:
        out[min(len(out) - 1, int(where * len(out)))] = value
    return bytes(out)


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=image_bytes)
def test_any_bytes_as_an_image_file_decode_or_raise_a_legrad_error(tmp_path, data):
    path = tmp_path / "fuzz.img"
    path.write_bytes(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            image = load_image(path)
            assert image.width > 0 and image.height > 0
        except LegradError:
            pass
    assert [str(w.message) for w in caught] == []  # PIL's notes never reach the user raw


@pytest.fixture(scope="module")
def fuzz_folder(model_folder, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz") / "model"
    shutil.copytree(model_folder, folder)
    return folder


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _paths(value, prefix=()):
    """Every (path, value) in a JSON document, the root included."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _paths(child, (*prefix, i))


@st.composite
def edited_metadata(draw, original: dict):
    data = json.loads(json.dumps(original))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(data) if p]
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
        else:
            parent[path[-1]] = draw(json_values)
    return data


@settings(max_examples=80, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_edit_to_the_metadata_loads_or_raises_a_legrad_error(fuzz_folder, model_folder, data):
    original = json.loads((model_folder / METADATA_FILE).read_text())
    edited = data.draw(edited_metadata(original))
    (fuzz_folder / METADATA_FILE).write_text(json.dumps(edited), encoding="utf-8")
    try:
        model = load(fuzz_folder, device="cpu")
    except LegradError:
        return
    result = model.explain(np.zeros((20, 20, 3), np.uint8), ["a cat"])
    assert np.isfinite(result.heatmaps).all()
