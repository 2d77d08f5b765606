"""A model folder's vocabulary through the runtime: `legrad info` shows it, `--vocabulary` uses it.

The runtime test model ships the vocabulary in tests/tiny_models.py (RUNTIME_VOCABULARY).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
from PIL import Image

from legrad_runtime import load
from legrad_runtime.cli import main as cli_main
from legrad_runtime.metadata import METADATA_FILE

EXPECTED_PROMPTS = {"a red circle", "a red square", "an orange circle", "an orange square"}


def test_the_model_knows_its_vocabulary(model_folder):
    vocabulary = load(model_folder, device="cpu").metadata.vocabulary
    assert set(vocabulary.prompts()) == EXPECTED_PROMPTS
    assert vocabulary.prompts(1)[0] == "a photo of a red circle"


def test_info_lists_the_vocabulary(model_folder, capsys):
    assert cli_main(["info", str(model_folder)]) == 0
    out = capsys.readouterr().out
    assert "color: red, orange" in out and "shape: circle, square" in out


def test_explain_with_vocabulary_writes_one_overlay_per_known_prompt(model_folder, tmp_path, capsys):
    image = tmp_path / "scene.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(image)
    code = cli_main(
        [
            "explain",
            str(model_folder),
            str(image),
            "--vocabulary",
            "-p",
            "a cat",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    written = {p.stem for p in (tmp_path / "o" / "scene").iterdir()}
    assert written == {p.replace(" ", "-") for p in EXPECTED_PROMPTS} | {"a-cat"}


def test_vocabulary_flag_on_a_model_without_one_is_a_usage_error(model_folder, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(model_folder, bare)
    data = json.loads((bare / METADATA_FILE).read_text())
    data["vocabulary"] = None
    (bare / METADATA_FILE).write_text(json.dumps(data))
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    assert cli_main(["explain", str(bare), str(image), "--vocabulary"]) == 2
    assert "has no vocabulary" in capsys.readouterr().err
