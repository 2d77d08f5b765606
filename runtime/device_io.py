"""How arrays reach one onnxruntime session and come back: `session.run` on the CPU, IO binding on a GPU.

Both take the same calls, so the session code is written once:

    io = io_for(session)               # PlainIO on the CPU, BoundIO on CUDA
    x = io.put(pixels)                 # a CUDA session: uploaded once, reused by every call
    host, kept = io.run({"pixel_values": x, "text_embeds": t}, host=["heatmaps"], keep=["image_embeds"],
                        sizes={"batch": 8, "prompts": 3})
    host["heatmaps"]                   # numpy, written by onnxruntime straight into our array
    kept["image_embeds"]               # still on the device: an input for another call

An output may be in both (a copy on the host, the original kept). One in neither is not copied back
(BoundIO leaves it on the device, PlainIO does not ask for it). On the CPU the plain path is kept:
binding there would only add work.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .providers import CUDA, NodePlacement, missing_onnxruntime, read_placement

try:
    import onnxruntime as ort
except ModuleNotFoundError as _exc:
    raise missing_onnxruntime(_exc) from None

__all__ = [
    "PlainIO",
    "BoundIO",
    "io_for",
    "preload_cuda_libraries",
    "profiled_placement",
    "profiling_options",
]

log = logging.getLogger("legrad_runtime")

_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class PlainIO:
    """onnxruntime's own `session.run`: numpy in, numpy out, nothing kept anywhere else."""

    device_type = "cpu"

    def __init__(self, session: ort.InferenceSession):
        self.session = session

    def put(self, array: np.ndarray) -> np.ndarray:
        return array

    def run(
        self,
        feeds: Mapping[str, Any],
        host: Sequence[str],
        keep: Sequence[str] = (),
        sizes: Mapping[str, int] | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        names = list(dict.fromkeys([*host, *keep]))
        got = dict(zip(names, self.session.run(names, dict(feeds))))
        return {n: got[n] for n in host}, {n: got[n] for n in keep}


class BoundIO:
    """IO binding on `device_type` ('cuda', or 'cpu' to exercise this path without a GPU): inputs
    put there once, host outputs written by onnxruntime straight into numpy arrays allocated here,
    kept outputs returned as OrtValues on the device."""

    def __init__(self, session: ort.InferenceSession, device_type: str, device_id: int = 0):
        self.session, self.device_type, self.device_id = session, device_type, device_id
        self._outputs = {o.name: o for o in session.get_outputs()}

    def put(self, array: np.ndarray) -> ort.OrtValue:
        """The array as an OrtValue on the device (a copy there; on 'cpu' it shares the array)."""
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type, self.device_id)

    def _host_array(self, name: str, sizes: Mapping[str, int]) -> np.ndarray | None:
        """An empty array for output `name` if its shape is known from `sizes`, else None."""
        meta = self._outputs[name]
        dims = [sizes.get(d) if isinstance(d, str) else d for d in meta.shape]
        shape = [d for d in dims if isinstance(d, int)]
        dtype = _NUMPY_TYPES.get(meta.type)
        if dtype is None or len(shape) != len(dims):
            return None
        return np.empty(shape, dtype)

    def run(
        self,
        feeds: Mapping[str, Any],
        host: Sequence[str],
        keep: Sequence[str] = (),
        sizes: Mapping[str, int] | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, ort.OrtValue]]:
        binding = self.session.io_binding()
        alive = []  # host inputs stay referenced until the run is over (older onnxruntimes hold none)
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                alive.append(np.ascontiguousarray(value))
                binding.bind_cpu_input(name, alive[-1])
        arrays: dict[str, np.ndarray] = {}
        for name in self._outputs:
            array = self._host_array(name, sizes or {}) if name in host and name not in keep else None
            if array is not None:
                arrays[name] = array
                binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            elif name in host and name not in keep:  # shape unknown before the run: onnxruntime allocates
                binding.bind_output(name, "cpu")
            else:  # kept or unwanted: stays on the device
                binding.bind_output(name, self.device_type, self.device_id)
        self.session.run_with_iobinding(binding)
        del alive
        produced = dict(zip(self._outputs, binding.get_outputs()))
        on_host = {n: arrays[n] if n in arrays else produced[n].numpy() for n in host}
        return on_host, {n: produced[n] for n in keep}


@functools.cache
def preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN where onnxruntime-gpu's CUDA provider will find them: its preload_dlls()
    (onnxruntime >= 1.21) loads them from pip's nvidia-* packages, or by their names; torch would
    do this on import, and the runtime imports no torch. What it prints about missing libraries is
    dropped: the CUDA provider then fails to start, and that is said once, as the fallback warning."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    with contextlib.redirect_stdout(io.StringIO()) as said:
        try:
            preload()
        except (OSError, RuntimeError) as exc:  # a broken CUDA install: the provider will say so
            log.debug("onnxruntime.preload_dlls failed: %s", exc)
    if said.getvalue().strip():
        log.debug("onnxruntime.preload_dlls: %s", said.getvalue().strip())


def io_for(session: ort.InferenceSession) -> PlainIO | BoundIO:
    """BoundIO on the session's CUDA device when CUDA is its first provider, else PlainIO."""
    if session.get_providers()[0] == CUDA:
        device_id = int(session.get_provider_options()[CUDA].get("device_id", 0))
        return BoundIO(session, "cuda", device_id)
    return PlainIO(session)


def profiling_options(options: ort.SessionOptions) -> str:
    """Turn on onnxruntime's profiler in `options`, writing into a new temporary folder (returned;
    profiled_placement removes it)."""
    folder = tempfile.mkdtemp(prefix="legrad-placement-")
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(folder, "profile")
    return folder


def profiled_placement(
    session: ort.InferenceSession, feeds: Mapping[str, Any], folder: str
) -> list[NodePlacement]:
    """Where each node ran, from one run of `feeds` on a session made with profiling_options(...),
    which returned `folder`: the run, the end of profiling (later runs are not profiled), the
    profile read, and the folder removed."""
    try:
        try:
            session.run(None, dict(feeds))
        finally:
            path = session.end_profiling()
        with open(path, encoding="utf-8") as fh:
            events = json.load(fh)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return read_placement(events)
