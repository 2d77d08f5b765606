"""CUDA done properly: devices, provider options, one fallback warning, node placement, IO binding,
the GPU memory budget. Torch-free.

Everything but the GPU itself is checked on the CPU: device strings and provider options as data;
the load path of a CUDA model with an onnxruntime that offers CUDA but fails it, drops it, or takes
it (a CPU session that reports CUDA); node placement read from a real profile made on the CPU; and
the IO-binding path run on the CPU, equal to the plain path to the bit. The tests marked `gpu` need
onnxruntime's CUDA provider and are skipped without it.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import onnxruntime as ort
import pytest

import legrad_runtime.session as session_module
from legrad_runtime import DeviceFallbackWarning, InputError, load
from legrad_runtime.cli import main as cli_main
from legrad_runtime.device_io import BoundIO, PlainIO, profiled_placement, profiling_options
from legrad_runtime.providers import (
    CPU,
    CUDA,
    CUDA_OPTIONS,
    Device,
    NodePlacement,
    OnnxruntimeMissingError,
    cuda_free_memory,
    cuda_options,
    device_of,
    fallback_nodes,
    missing_onnxruntime,
    parse_device,
    providers,
    read_placement,
)
from legrad_runtime.session import DEFAULT_MEMORY_BUDGET, session_options

HAS_CUDA = CUDA in ort.get_available_providers()
PROMPTS = ["a photo of a cat", "a remote control", "a red square"]


def gpu(test):
    """Marked `gpu`, and skipped without onnxruntime's CUDA provider."""
    skip = pytest.mark.skipif(not HAS_CUDA, reason="onnxruntime's CUDA provider is not available")
    return pytest.mark.gpu(skip(test))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (40 + 9 * i, 70 - 5 * i, 3), dtype=np.uint8) for i in range(5)]


def _same(a, b, fields=("heatmaps", "layer_maps", "image_embeds", "text_embeds", "logits", "class_ids")):
    for name in fields:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        assert x is None or (x.dtype == y.dtype and np.array_equal(x, y)), name


# ---------------------------------------------------------------- devices and provider options


@pytest.mark.parametrize(
    "text, device",
    [("auto", Device("auto")), ("cpu", Device("cpu")), ("cuda", Device("cuda", 0)),
     ("cuda:0", Device("cuda", 0)), ("cuda:1", Device("cuda", 1)), ("cuda:12", Device("cuda", 12))],
)  # fmt: skip
def test_device_strings_are_parsed(text, device):
    assert parse_device(text) == device
    assert str(device) == {"cuda:0": "cuda"}.get(text, text)


@pytest.mark.parametrize("text", ["gpu", "CUDA", "cuda:", "cuda:-1", "cuda:x", "cuda:1.0", " cuda", "cpu:0",
                                  "cuda:١", "cuda:99999", "auto:1", ""])  # fmt: skip
def test_bad_device_strings_are_refused_with_the_forms_that_work(text):
    with pytest.raises(InputError, match=r"unknown device .*auto, cpu, cuda, cuda:N"):
        parse_device(text)


def test_a_device_that_is_not_a_string_is_a_type_error():
    with pytest.raises(TypeError, match="device must be a string"):
        parse_device(0)


def test_cuda_options_state_every_choice_and_name_the_device():
    options = cuda_options(1)
    assert options == {
        "device_id": "1",
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
        "use_tf32": "0",
        "do_copy_in_default_stream": "1",
    }
    assert cuda_options(0, gpu_mem_limit=3 * 2**30)["gpu_mem_limit"] == str(3 * 2**30)
    assert "gpu_mem_limit" not in cuda_options(0)  # no cap: onnxruntime's default


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "1"])
def test_a_bad_gpu_memory_limit_is_refused_everywhere(limit, model_folder):
    with pytest.raises(InputError, match="gpu_mem_limit"):
        cuda_options(0, limit)
    with pytest.raises(InputError, match="gpu_mem_limit"):
        load(model_folder, device="cpu", gpu_mem_limit=limit)  # checked on a CPU too, before the folder


def test_providers_put_cuda_first_with_its_options_only_when_offered_and_wanted():
    both = [CUDA, CPU]
    assert providers(Device("cuda", 1), both, 2**30) == [(CUDA, cuda_options(1, 2**30)), CPU]
    assert providers(Device("auto"), both) == [(CUDA, cuda_options(0)), CPU]
    assert providers(Device("cpu"), both) == [CPU]
    assert providers(Device("cuda"), [CPU]) == [CPU]
    assert providers(Device("auto"), ["AzureExecutionProvider", CPU]) == [CPU]


def test_the_device_of_a_session_comes_from_its_providers_and_options():
    assert device_of([CUDA, CPU], {CUDA: {"device_id": "2"}, CPU: {}}) == "cuda:2"
    assert device_of([CPU], {CPU: {}}) == "cpu"


def test_a_cpu_model_says_where_each_graph_runs(model_folders):
    assert load(model_folders["squash"], device="cpu").devices == {"image": "cpu", "text": "cpu"}
    classifier = load(model_folders["classifier"], device="cpu")
    assert classifier.devices == {"image": "cpu"} and classifier.cpu_fallback_nodes() == []
    assert classifier.memory_budget == DEFAULT_MEMORY_BUDGET


# ---------------------------------------------------------------- one warning, never two


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, caught


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_gives_exactly_one_warning(model_folder, device):
    model, caught = _caught(lambda: load(model_folder, device=device))
    assert [w.category for w in caught] == [DeviceFallbackWarning], [str(w.message) for w in caught]
    assert f"device={device!r} was asked for" in str(caught[0].message)
    assert "offers only" in str(caught[0].message) and "legrad-onnx[gpu]" in str(caught[0].message)
    assert model.device == "cpu" and model.devices == {"image": "cpu", "text": "cpu"}


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA")
def test_the_cli_says_once_that_cuda_1_is_not_there(model_folder, tmp_path, capsys, images):
    from PIL import Image

    Image.fromarray(images[0]).save(tmp_path / "a.png")
    code = cli_main(["explain", str(model_folder), str(tmp_path / "a.png"), "-p", "x", "--device", "cuda:1",
                     "--gpu-mem-limit", "0.5", "--out", str(tmp_path / "o")])  # fmt: skip
    err = [ln for ln in capsys.readouterr().err.splitlines() if "device=" in ln]
    assert code == 0 and len(err) == 1 and err[0].startswith("legrad: warning: device='cuda:1'")


@pytest.mark.parametrize("device", ["gpu", "cuda:-1", "cuda:x"])
def test_the_cli_refuses_a_bad_device_as_a_usage_error(model_folder, tmp_path, capsys, device):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["explain", str(model_folder), str(tmp_path), "-p", "x", "--device", device])
    assert exit_.value.code == 2 and f"unknown device {device!r}" in capsys.readouterr().err


@pytest.mark.parametrize("limit", ["0", "-2", "1e9"])
def test_the_cli_refuses_a_bad_gpu_memory_limit_in_one_line(model_folder, tmp_path, capsys, limit):
    code = cli_main(["explain", str(model_folder), str(tmp_path), "-p", "x", f"--gpu-mem-limit={limit}",
                     "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--gpu-mem-limit must be in (0, 16384] GiB" in err[0]


class _PretendCuda:
    """A CPU session that reports the CUDA provider on device `index`, as onnxruntime-gpu's would."""

    def __init__(self, session: ort.InferenceSession, index: int):
        self._session, self._index = session, index

    def __getattr__(self, name):
        return getattr(self._session, name)

    def get_providers(self):
        return [CUDA, CPU]

    def get_provider_options(self):
        return {CUDA: {"device_id": str(self._index), **CUDA_OPTIONS}, CPU: {}}


@pytest.fixture
def offered_cuda(monkeypatch, tmp_path):
    """An onnxruntime that offers CUDA; its sessions 'raise' when CUDA is asked for, 'drop' it (a CPU
    session, as onnxruntime does when the CUDA libraries are missing) or 'take' it (a CPU session
    that reports CUDA). Returns (set_behaviour, providers asked for by each session, temp folder)."""
    real, asked, state = ort.InferenceSession, [], {"behaviour": "take"}
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the placement profile goes

    def session(model, options=None, providers=None, **kwargs):
        asked.append([p[0] if isinstance(p, tuple) else p for p in providers])
        if asked[-1][0] != CUDA:
            return real(model, options, providers=providers, **kwargs)
        if state["behaviour"] == "raise":
            raise RuntimeError("CUDA failure 101: invalid device ordinal")
        cpu = real(model, options, providers=[CPU], **kwargs)
        return cpu if state["behaviour"] == "drop" else _PretendCuda(cpu, int(providers[0][1]["device_id"]))

    monkeypatch.setattr(session_module.ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(session_module.ort, "InferenceSession", session)
    return (lambda b: state.update(behaviour=b)), asked, tmp_path


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_failing_cuda_provider_gives_one_warning_and_one_try(model_folder, offered_cuda, device):
    behave, asked, tmp = offered_cuda
    behave("raise")
    model, caught = _caught(lambda: load(model_folder, device=device))
    assert [w.category for w in caught] == [DeviceFallbackWarning], [str(w.message) for w in caught]
    assert "failed to start" in str(caught[0].message) and "invalid device ordinal" in str(caught[0].message)
    assert asked == [[CUDA, CPU], [CPU], [CPU]]  # image on CUDA once, then the CPU; text straight there
    assert model.devices == {"image": "cpu", "text": "cpu"} and not list(tmp.iterdir())


def test_a_cuda_provider_dropped_silently_gives_one_warning_and_no_profiling(model_folder, offered_cuda):
    behave, asked, tmp = offered_cuda
    behave("drop")
    model, caught = _caught(lambda: load(model_folder, device="cuda"))
    assert [w.category for w in caught] == [DeviceFallbackWarning]
    assert "missing CUDA / cuDNN" in str(caught[0].message)
    assert asked == [[CUDA, CPU], [CPU]] and model.devices == {"image": "cpu", "text": "cpu"}
    assert not list(tmp.iterdir())  # the profile of the would-be CUDA session was ended and removed
    assert model._image.end_profiling() == ""  # and the session profiles no more


def test_auto_says_why_cuda_was_not_used_in_the_log_not_as_a_warning(model_folder, offered_cuda, caplog):
    offered_cuda[0]("raise")
    with caplog.at_level(logging.WARNING, logger="legrad_runtime"):
        model, caught = _caught(lambda: load(model_folder, device="auto"))
    assert caught == [] and model.device == "cpu"
    assert any("device='auto' runs on the CPU" in r.message for r in caplog.records)


def test_a_model_on_cuda_reports_its_device_checks_placement_and_takes_half_the_free_memory(
    model_folder, offered_cuda, caplog, monkeypatch, images
):
    _, asked, tmp = offered_cuda
    monkeypatch.setattr(session_module, "cuda_free_memory", lambda index: 10 * 2**30 if index == 1 else None)
    with caplog.at_level(logging.INFO, logger="legrad_runtime"):
        model, caught = _caught(lambda: load(model_folder, device="cuda:1"))
    assert caught == [] and asked == [[CUDA, CPU], [CUDA, CPU]]
    assert model.device == "cuda" and model.devices == {"image": "cuda:1", "text": "cuda:1"}
    assert isinstance(model._image_io, BoundIO) and model._image_io.device_id == 1
    assert model.memory_budget == 5 * 2**30
    # the "CUDA" session really ran on the CPU: every node fell back, the prompt Scan among the heavy
    heavy = model.cpu_fallback_nodes(heavy_only=True)
    assert "Scan" in {n.op_type for n in heavy} and len(model.cpu_fallback_nodes()) > len(heavy)
    warned = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "heavy node(s) of legrad_image.onnx run on the CPU, not cuda:1" in warned[0]
    assert any("graph on cuda:1" in r.message for r in caplog.records if r.levelno == logging.INFO)
    assert not list(tmp.iterdir())  # the profile was read and removed
    # the same model, bound on the CPU instead of the (pretend) GPU, explains as the plain CPU path
    model._image_io, model._text_io = BoundIO(model._image, "cpu"), BoundIO(model._text, "cpu")
    _same(model.explain(images, PROMPTS), load(model_folder, device="cpu").explain(images, PROMPTS))


def test_the_gpu_memory_limit_caps_the_default_budget(model_folder, offered_cuda, monkeypatch):
    monkeypatch.setattr(session_module, "cuda_free_memory", lambda index: 10 * 2**30)
    assert load(model_folder, device="cuda", gpu_mem_limit=2**30).memory_budget == 2**29
    monkeypatch.setattr(session_module, "cuda_free_memory", lambda index: None)  # no driver to ask
    assert load(model_folder, device="cuda", gpu_mem_limit=2**30).memory_budget == 2**29
    assert load(model_folder, device="cuda").memory_budget == DEFAULT_MEMORY_BUDGET


def test_free_memory_is_none_without_a_cuda_driver():
    from legrad_runtime.providers import _libcuda

    if _libcuda() is not None:
        pytest.skip("this machine has a CUDA driver")
    assert cuda_free_memory(0) is None


# ---------------------------------------------------------------- node placement from a profile


def _warmup_feeds(embed_dim: int, size=(64, 64)):
    return {
        "pixel_values": np.zeros((1, 3, *size), np.float32),
        "text_embeds": np.eye(1, embed_dim, dtype=np.float32),
    }


def test_placement_is_read_from_a_real_profile_each_node_once(model_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    options = session_options(1)
    folder = profiling_options(options)
    session = ort.InferenceSession(str(model_folder / "legrad_image.onnx"), options, providers=[CPU])
    placement = profiled_placement(session, _warmup_feeds(32), folder)
    names = [n.name for n in placement]
    assert len(names) == len(set(names)) > 50  # the Scan body's nodes once, not once per prompt
    assert {n.provider for n in placement} == {CPU}
    scan = [n for n in placement if n.op_type == "Scan"]
    assert len(scan) == 1 and scan[0].heavy  # the prompt loop: heavy by what it is, whatever its size
    assert any(n.op_type == "MatMul" and n.heavy for n in placement)
    assert any(n.op_type == "Shape" and not n.heavy for n in placement)
    assert not list(tmp_path.iterdir()) and session.end_profiling() == ""  # removed; profiling over
    # where the session's first provider is CPU nothing fell back; under CUDA, all of it would have
    assert fallback_nodes(placement, [CPU]) == [] and fallback_nodes(placement, [CUDA, CPU]) == placement


def _event(name, op, provider, shapes, cat="Node"):
    return {
        "cat": cat,
        "name": name,
        "args": {"op_name": op, "provider": provider, "output_type_shape": shapes},
    }


def test_placement_reading_keeps_node_events_and_the_largest_size_seen():
    events = [
        {"cat": "Session", "name": "model_run", "args": {}},
        _event("scan_kernel_time", "Scan", CUDA, [{"float": [1, 8]}]),
        _event("mm_kernel_time", "MatMul", CUDA, [{"float": [2, 197, 768]}]),
        _event("mm_kernel_time", "MatMul", CUDA, [{"float": [1, 197, 768]}]),  # a Scan's later iteration
        _event("shape_kernel_time", "Shape", CPU, [{"int64": [4]}]),
        _event("gather_kernel_time", "Gather", CPU, [{"float": [32, 32]}]),
        {"cat": "Node", "name": "mm_fence_before", "args": {"op_name": "MatMul"}},
    ]
    placement = read_placement(events)
    assert [(n.name, n.op_type, n.provider, n.elements) for n in placement] == [
        ("scan", "Scan", CUDA, 8),
        ("mm", "MatMul", CUDA, 2 * 197 * 768),
        ("shape", "Shape", CPU, 4),
        ("gather", "Gather", CPU, 1024),
    ]
    fell = fallback_nodes(placement, [CUDA, CPU])
    assert [n.name for n in fell] == ["shape", "gather"] and [n.heavy for n in fell] == [False, True]
    assert str(fell[1]) == "Gather 'gather' (1,024 elements)"
    assert NodePlacement("s", "Scan", CPU, 0).heavy and NodePlacement("l", "Loop", CPU, 0).heavy


# ---------------------------------------------------------------- IO binding, exercised on the CPU


class _CountingIO(BoundIO):
    """BoundIO on the CPU that records what is put on the 'device' and what each call copies back."""

    def __init__(self, session):
        super().__init__(session, "cpu")
        self.puts, self.hosts = [], []

    def put(self, array):
        self.puts.append(array.shape)
        return super().put(array)

    def run(self, feeds, host, keep=(), sizes=None):
        self.hosts.append(list(host))
        return super().run(feeds, host, keep, sizes)


@pytest.fixture(scope="module")
def clip(model_folders):
    return load(model_folders["squash"], device="cpu")


@pytest.fixture
def bound(model_folders):
    model = load(model_folders["squash"], device="cpu")
    model._image_io, model._text_io = _CountingIO(model._image), BoundIO(model._text, "cpu")
    return model


def test_a_cpu_model_runs_the_plain_path(clip):
    assert isinstance(clip._image_io, PlainIO) and isinstance(clip._text_io, PlainIO)


SPLITS = [{}, {"memory_budget": 1}, {"batch_size": 2}, {"batch_size": 2, "memory_budget": 1}]


@pytest.mark.parametrize("kwargs", SPLITS)
def test_io_binding_gives_the_plain_paths_results_to_the_bit(clip, bound, images, kwargs):
    _same(bound.explain(images, PROMPTS, **kwargs), clip.explain(images, PROMPTS, **kwargs))


def test_pixels_are_put_once_per_batch_and_prompt_chunks_once_per_call(bound, images):
    bound.explain(images, PROMPTS, batch_size=2, memory_budget=1)  # 3 batches × 3 one-prompt calls
    pixels = [s for s in bound._image_io.puts if len(s) == 4]
    prompts = [s for s in bound._image_io.puts if len(s) == 2]
    assert pixels == [(2, 3, 64, 64), (2, 3, 64, 64), (1, 3, 64, 64)]
    assert prompts == [(1, 32)] * 3  # put once, reused by all three batches
    assert len(bound._image_io.hosts) == 9


def test_the_text_graphs_output_is_bound_to_the_image_graph_as_it_is(bound, images):
    bound.explain(images, PROMPTS)  # ≤ 64 prompts, one call: the text output goes in as it came out
    assert [s for s in bound._image_io.puts if len(s) == 2] == []
    many = [f"prompt number {i}" for i in range(70)]  # two text calls: put from the host instead
    bound._image_io.puts.clear()
    bound.explain(images[:1], many)
    assert [s for s in bound._image_io.puts if len(s) == 2] == [(70, 32)]


def test_seventy_prompts_bound_equal_the_plain_path(clip, bound, images):
    many = [f"a photo of thing number {i}" for i in range(70)]
    _same(bound.explain(images[:2], many), clip.explain(images[:2], many))


def test_layer_maps_left_out_are_not_copied_back(clip, bound, images):
    result = bound.explain(images, PROMPTS, layer_maps=False)
    assert result.layer_maps is None and all("layer_maps" not in h for h in bound._image_io.hosts)
    full = clip.explain(images, PROMPTS)
    assert np.array_equal(result.heatmaps, full.heatmaps)
    assert np.array_equal(result.image_embeds, full.image_embeds)
    with pytest.raises(InputError, match="layer_maps=False"):
        result.layer_figure(0, 0)
    plain = clip.explain(images, PROMPTS, layer_maps=False)
    assert plain.layer_maps is None and np.array_equal(plain.heatmaps, full.heatmaps)


def test_batches_in_a_stream_without_layer_maps_concatenate(clip, images):
    parts = list(clip.explain_batches(images, PROMPTS, batch_size=2, layer_maps=False))
    assert len(parts) == 3 and all(p.layer_maps is None for p in parts)
    assert clip.explain(images, PROMPTS, batch_size=2, layer_maps=False).layer_maps is None


@pytest.mark.parametrize("classes", [["tabby cat", 281, 3], "top-3"])
@pytest.mark.parametrize("layer_maps", [True, False])
def test_a_classifier_bound_equals_the_plain_path(model_folders, images, classes, layer_maps):
    plain = load(model_folders["classifier"], device="cpu")
    bound = load(model_folders["classifier"], device="cpu")
    bound._image_io = _CountingIO(bound._image)
    kwargs = {"classes": classes, "batch_size": 2, "layer_maps": layer_maps}
    _same(bound.explain(images, **kwargs), plain.explain(images, **kwargs))
    assert len([s for s in bound._image_io.puts if len(s) == 4]) == 3  # pixels once per batch, top-K too
    if classes == "top-3":  # the logits-only first call copies back nothing else
        assert ["logits"] in bound._image_io.hosts


def test_bound_outputs_of_unknown_shape_are_still_copied_back(clip):
    io = BoundIO(clip._text, "cpu")
    ids = clip.tokenizer(["a cat", "a dog"])
    host, kept = io.run({"input_ids": ids}, host=["text_embeds"], keep=["text_embeds"])  # no sizes given
    expected = clip._text.run(None, {"input_ids": ids})[0]
    assert np.array_equal(host["text_embeds"], expected)
    assert isinstance(kept["text_embeds"], ort.OrtValue)
    assert np.array_equal(kept["text_embeds"].numpy(), expected)


# ---------------------------------------------------------------- onnxruntime missing


def test_a_missing_onnxruntime_is_named_with_the_fix():
    exc = ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")
    error = missing_onnxruntime(exc)
    assert isinstance(error, OnnxruntimeMissingError) and isinstance(error, ImportError)
    assert "legrad-onnx[export,cpu]" in str(error) and "legrad-onnx[gpu]" in str(error)
    other = ModuleNotFoundError("No module named 'numpy'", name="numpy")
    assert missing_onnxruntime(other) is other  # onnxruntime is there; something it needs is not


def test_the_runtime_without_onnxruntime_stops_with_one_line():
    code = "import sys; sys.modules['onnxruntime'] = None\nfrom legrad_runtime import load"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0
    assert last.startswith("legrad_runtime.providers.OnnxruntimeMissingError: onnxruntime is not installed")


# ---------------------------------------------------------------- on a GPU (marked gpu)


@pytest.fixture(scope="module")
def on_gpu(model_folders):
    if not HAS_CUDA:
        pytest.skip("onnxruntime's CUDA provider is not available")
    return {name: load(model_folders[name], device="cuda") for name in ("squash", "siglip", "classifier")}


@gpu
def test_both_graphs_run_on_the_gpu_with_the_stated_options(on_gpu):
    model = on_gpu["squash"]
    assert model.devices == {"image": "cuda:0", "text": "cuda:0"} and model.device == "cuda"
    for session in (model._image, model._text):
        assert session.get_providers()[0] == CUDA
        applied = session.get_provider_options()[CUDA]
        assert applied["device_id"] == "0" and applied["use_tf32"] == "0", applied
        assert applied["cudnn_conv_algo_search"] == "HEURISTIC", applied
        assert applied["arena_extend_strategy"] in ("kSameAsRequested", "1"), applied
    assert isinstance(model._image_io, BoundIO) and model._image_io.device_type == "cuda"


@gpu
@pytest.mark.parametrize("name", ["squash", "siglip", "classifier"])
def test_no_heavy_node_of_the_image_graph_falls_back_to_the_cpu(on_gpu, name):
    heavy = on_gpu[name].cpu_fallback_nodes(heavy_only=True)
    assert not heavy, f"{name}: {len(heavy)} heavy node(s) on the CPU: " + "; ".join(map(str, heavy))
    print(name, "nodes on the CPU:", "; ".join(map(str, on_gpu[name].cpu_fallback_nodes())) or "none")


@gpu
@pytest.mark.parametrize("kwargs", [{}, {"memory_budget": 1}, {"batch_size": 2, "layer_maps": False}])
def test_the_gpu_explains_as_the_cpu_does(on_gpu, model_folders, images, kwargs):
    gpu_result = on_gpu["squash"].explain(images, PROMPTS, **kwargs)
    cpu_result = load(model_folders["squash"], device="cpu").explain(images, PROMPTS, **kwargs)
    np.testing.assert_allclose(gpu_result.heatmaps, cpu_result.heatmaps, atol=1e-4)
    np.testing.assert_allclose(gpu_result.image_embeds, cpu_result.image_embeds, atol=1e-5)
    np.testing.assert_allclose(gpu_result.text_embeds, cpu_result.text_embeds, atol=1e-5)
    assert (gpu_result.layer_maps is None) == (cpu_result.layer_maps is None)
    if gpu_result.layer_maps is not None:
        np.testing.assert_allclose(gpu_result.layer_maps, cpu_result.layer_maps, atol=1e-4, rtol=1e-4)


@gpu
def test_a_classifier_on_the_gpu_explains_its_top_classes_as_the_cpu_does(on_gpu, model_folders, images):
    got = on_gpu["classifier"].explain(images, classes="top-3", batch_size=2)
    want = load(model_folders["classifier"], device="cpu").explain(images, classes="top-3", batch_size=2)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-4)
    assert np.array_equal(got.class_ids, want.class_ids)
    np.testing.assert_allclose(got.heatmaps, want.heatmaps, atol=1e-4)


@gpu
def test_inputs_and_text_embeddings_live_on_the_gpu(on_gpu, images):
    model = on_gpu["squash"]
    text, kept = model._embed_text(PROMPTS)
    assert isinstance(kept, ort.OrtValue) and kept.device_name().lower() == "cuda"
    assert np.array_equal(kept.numpy(), text)
    pixels = model._image_io.put(np.zeros((1, 3, 64, 64), np.float32))
    assert pixels.device_name().lower() == "cuda"


@gpu
def test_the_default_budget_is_half_the_gpus_free_memory(on_gpu, model_folders):
    free = cuda_free_memory(0)
    assert free is not None and free > 2**30
    budget = on_gpu["squash"].memory_budget
    assert 0.3 * free < budget <= 0.5 * free + 2**30, (budget, free)
    limited = load(model_folders["squash"], device="cuda", gpu_mem_limit=2**30)
    assert limited.memory_budget <= 2**29
    assert limited._image.get_provider_options()[CUDA]["gpu_mem_limit"] == str(2**30)


@gpu
def test_a_gpu_that_is_not_there_gives_one_warning_and_the_cpu(model_folder, capfd):
    model, caught = _caught(lambda: load(model_folder, device="cuda:63"))
    assert [w.category for w in caught] == [DeviceFallbackWarning], [str(w.message) for w in caught]
    assert "device='cuda:63'" in str(caught[0].message)
    assert model.devices == {"image": "cpu", "text": "cpu"}
    assert "EP Error" not in capfd.readouterr().out  # onnxruntime's own fallback did not print


@gpu
def test_placement_is_logged_once_per_load(model_folder, caplog):
    with caplog.at_level(logging.INFO, logger="legrad_runtime"):
        load(model_folder, device="cuda")
    placed = [r for r in caplog.records if "run on the CPU" in r.message]
    assert all(r.levelno == logging.INFO for r in placed), [r.message for r in placed]
    print(json.dumps([r.message for r in caplog.records]))
