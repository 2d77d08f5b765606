"""The memory budget and the thread count, by what they do: measured peak memory, the calls made,
the maps they give. Torch-free.

Peak memory is measured in a fresh process per case, as Linux reports it: /proc/self/status's
VmHWM (the peak resident set), reset to the current size just before the explain call by writing
5 to /proc/self/clear_refs, after a warm-up call has paid onnxruntime's one-off allocations. Its
growth over the explain call covers everything the call holds at its peak: onnxruntime's arena
(the graph intermediates the budget bounds) and the outputs (each batch's heatmaps, held twice
while its prompt chunks are concatenated). So the check is

    growth <= budget + 2 * outputs of one batch + SLACK

with SLACK for the allocator's rounding and Python's own small objects (measured: 2 to 5 MiB over
on a 4 MiB budget; never under the budget's share by less than a few MiB at 32 MiB). Other
processes on the machine do not count: the resident set is this process's own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from legrad_runtime import load
from legrad_runtime.errors import InputError

MIB = 2**20
SLACK = 16 * MIB
PROMPTS = 1500  # enough that one call for all of them would hold far more than the small budgets

PROBE = r"""
import json, sys
import numpy as np
from legrad_runtime import load

def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(key)

folder, budget, prompts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = load(folder, device="cpu", threads=1)
h, w = model.metadata.image_size
rng = np.random.default_rng(0)
images = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for _ in range(2)]
text = model.embed_text([f"a photo of thing number {i}" for i in range(prompts)])
model.explain(images[:1], text_embeds=text[:1], layer_maps=False)  # warm-up: one-off allocations
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # the peak (VmHWM) starts again from the current resident set
before, largest = status("VmRSS"), 0
for batch in model.explain_batches(
    images, text_embeds=text, batch_size=1, memory_budget=budget, layer_maps=False
):
    largest = max(largest, batch.heatmaps.nbytes)
    del batch
print(json.dumps({"growth": status("VmHWM") - before, "output": largest}))
"""


def _peak_growth(folder: Path, budget: int) -> tuple[int, int]:
    """(peak resident-set growth over one explain call of 2 images × PROMPTS, one batch's heatmaps
    in bytes), measured in a fresh process."""
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(folder), str(budget), str(PROMPTS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return result["growth"], result["output"]


def _can_reset_the_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return "VmHWM" in Path("/proc/self/status").read_text()
    except OSError:
        return False


needs_peak_reset = pytest.mark.skipif(
    not _can_reset_the_peak(), reason="needs Linux's /proc/self/clear_refs to measure a peak"
)


@needs_peak_reset
@pytest.mark.parametrize("kind", ["squash", "longest", "siglip"])  # token head; non-square; MAP head
def test_peak_memory_of_an_explain_call_stays_within_its_budget(model_folders, kind):
    budget = 32 * MIB
    growth, output = _peak_growth(model_folders[kind], budget)
    assert growth <= budget + 2 * output + SLACK, (growth / MIB, output / MIB)


@needs_peak_reset
def test_the_measure_sees_the_intermediates_a_budget_saves(model_folder):
    """One call for every prompt (a budget that fits them all) grows far more than calls of a 4 MiB
    budget, which still stays within it: the probe measures what the budget bounds."""
    small, output = _peak_growth(model_folder, 4 * MIB)
    assert small <= 4 * MIB + 2 * output + SLACK, (small / MIB, output / MIB)
    whole, _ = _peak_growth(model_folder, 2 * 1024 * MIB)
    assert whole > small + 32 * MIB, (whole / MIB, small / MIB)


# ---------------------------------------------------------------- calls and maps, in process


class _CallLog:
    """Stands in for the image graph's onnxruntime session, recording each call's (images, prompts)."""

    def __init__(self, session):
        self.session, self.calls = session, []

    def run(self, names, feeds):
        self.calls.append((len(feeds["pixel_values"]), len(feeds["text_embeds"])))
        return self.session.run(names, feeds)

    def __getattr__(self, name):
        return getattr(self.session, name)


def _logged(model) -> _CallLog:
    log = _CallLog(model._image_io.session)
    model._image_io.session = log  # the CPU path calls session.run with numpy feeds
    return log


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(5)
    paths = []
    for k, (w, h) in enumerate([(64, 64), (100, 70), (40, 90)]):
        paths.append(folder / f"p{k}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_a_smaller_budget_makes_more_smaller_calls_with_identical_maps(model_folder, photos):
    model = load(model_folder, device="cpu")
    log = _logged(model)
    prompts = [f"a photo of thing number {i}" for i in range(40)]
    runs = {}
    for budget in (2 * 1024 * MIB, 4 * MIB, 256 * 1024, 1):
        log.calls = []
        runs[budget] = (model.explain(photos, prompts, memory_budget=budget), list(log.calls))
    sizes = [max(b * p for b, p in calls) for _, calls in runs.values()]
    counts = [len(calls) for _, calls in runs.values()]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1] == 1  # the last: one pair a call
    assert counts == sorted(counts) and counts[0] < counts[-1] == 3 * 40
    whole = runs[2 * 1024 * MIB][0]
    for result, calls in runs.values():
        assert sum(b * p for b, p in calls) == 3 * 40  # every pair once
        np.testing.assert_allclose(result.heatmaps, whole.heatmaps, rtol=0, atol=1e-6)
        np.testing.assert_allclose(result.similarities, whole.similarities, rtol=0, atol=1e-6)


def test_a_budget_given_at_load_splits_every_call_that_names_none(model_folder, photos):
    prompts = [f"a photo of thing number {i}" for i in range(20)]
    small = load(model_folder, device="cpu", memory_budget=1)
    default = load(model_folder, device="cpu")
    logs = [_logged(small), _logged(default)]
    maps = [m.explain(photos[:2], prompts).heatmaps for m in (small, default)]
    assert logs[0].calls == [(1, 1)] * 40 and len(logs[1].calls) < 40
    np.testing.assert_allclose(maps[0], maps[1], rtol=0, atol=1e-6)
    logs[0].calls = []
    small.explain(photos[:2], prompts, memory_budget=2 * 1024 * MIB)  # a call's own budget wins
    assert len(logs[0].calls) < 40


@pytest.mark.parametrize("budget", [0, -5, 1.5, True, "1"])
def test_bad_budgets_are_refused_at_load_and_per_call(model_folder, photos, budget):
    with pytest.raises(InputError, match="memory_budget must be a positive integer"):
        load(model_folder, device="cpu", memory_budget=budget)
    model = load(model_folder, device="cpu")
    with pytest.raises(InputError, match="memory_budget must be a positive integer"):
        model.explain(photos[:1], ["a cat"], memory_budget=budget)


# ---------------------------------------------------------------- threads


def test_the_thread_count_reaches_both_graphs_and_leaves_the_maps_as_they_were(model_folder, photos):
    one, default = load(model_folder, device="cpu", threads=1), load(model_folder, device="cpu")
    for session in (one._image, one._text):
        assert session.get_session_options().intra_op_num_threads == 1
    maps = [m.explain(photos, ["a cat", "a red square"]).heatmaps for m in (one, default)]
    np.testing.assert_allclose(maps[0], maps[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("threads", [0, -2, 1.5, "2"])
def test_bad_thread_counts_are_refused_before_any_file_is_read(tmp_path, threads):
    with pytest.raises(InputError, match="threads"):
        load(tmp_path / "no-such-model", device="cpu", threads=threads)
