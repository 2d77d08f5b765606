"""Where the graphs run: device strings, onnxruntime's provider list and options, node placement.

Torch-free and onnxruntime-free (stdlib only), so it can be imported and tested anywhere, and so the
exporter can name the missing onnxruntime in one line before anything imports it:

    parse_device("cuda:1")                   # Device(kind='cuda', index=1)
    providers(Device("cuda", 1), available)  # [('CUDAExecutionProvider', {...}), 'CPUExecutionProvider']
    read_placement(json.load(profile))       # each node of a run, with the provider that ran it

The CUDA provider's options are stated here rather than left to onnxruntime's defaults (see
CUDA_OPTIONS). A GPU's free memory is read through the CUDA driver (libcuda, which ships with the
NVIDIA driver) by ctypes: no torch, no nvidia-smi, and None where there is no driver.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InputError, LegradError

__all__ = [
    "CPU",
    "CUDA",
    "CUDA_OPTIONS",
    "DEVICE_FORMS",
    "Device",
    "NodePlacement",
    "OnnxruntimeMissingError",
    "Providers",
    "cuda_free_memory",
    "cuda_options",
    "device_of",
    "fallback_nodes",
    "missing_onnxruntime",
    "parse_device",
    "providers",
    "read_placement",
]

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
DEVICE_FORMS = ("auto", "cpu", "cuda", "cuda:N")  # what `device=` and `--device` accept

# The CUDA provider's options, each chosen rather than inherited from onnxruntime's defaults:
# - arena_extend_strategy kSameAsRequested: the arena grows by what a call needs, not to the next
#   power of two (onnxruntime's default), so the memory budget and gpu_mem_limit mean what they say;
# - cudnn_conv_algo_search HEURISTIC: the one convolution (the patch embedding) takes cuDNN's
#   heuristic pick; EXHAUSTIVE (the default) benchmarks every algorithm again for each new batch
#   size, and its workspace, for a conv that is a sliver of the work;
# - use_tf32 0: float32 matrix products and convolutions in full float32, as on the CPU and as the
#   exporter's verification tolerances assume; onnxruntime's default (1) rounds their inputs to
#   TF32's 10-bit mantissa on Ampere and later GPUs (faster, ~1e-3 relative error);
# - do_copy_in_default_stream 1 (the default, stated): copies and kernels on one stream, no races.
CUDA_OPTIONS: Mapping[str, str] = {
    "arena_extend_strategy": "kSameAsRequested",
    "cudnn_conv_algo_search": "HEURISTIC",
    "use_tf32": "0",
    "do_copy_in_default_stream": "1",
}
CONTROL_FLOW = frozenset({"Scan", "Loop", "If"})  # their bodies run where they are placed
HEAVY_ELEMENTS = 1024  # a node touching a tensor this large is real work, not shape arithmetic


class OnnxruntimeMissingError(LegradError, ImportError):
    """Neither onnxruntime nor onnxruntime-gpu is installed."""


def missing_onnxruntime(exc: ModuleNotFoundError) -> ImportError:
    """What to raise when `import onnxruntime` failed: one line naming the fix when onnxruntime
    itself is missing, else the original error (a module onnxruntime needs is missing)."""
    if exc.name != "onnxruntime":
        return exc
    return OnnxruntimeMissingError(
        "onnxruntime is not installed; install one of its two builds with legrad-onnx: "
        'pip install "legrad-onnx[cpu]" (CPU) or "legrad-onnx[gpu]" (onnxruntime-gpu, CUDA); '
        'the exporter needs one too: "legrad-onnx[export,cpu]" or "legrad-onnx[export,gpu]"'
    )


@dataclass(frozen=True)
class Device:
    """A parsed `device=`: kind 'auto', 'cpu' or 'cuda', and the CUDA device index (0 unless named)."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return self.kind if self.kind != "cuda" or self.index == 0 else f"cuda:{self.index}"


def parse_device(device: str) -> Device:
    """'auto', 'cpu', 'cuda' or 'cuda:N' (N a device index, 0 first) as a Device."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cuda:0', not {type(device).__name__}")
    kind, colon, index = device.partition(":")
    if not colon and kind in ("auto", "cpu", "cuda"):
        return Device(kind)
    if kind == "cuda" and index.isdecimal() and index.isascii() and len(index) <= 4:
        return Device("cuda", int(index))
    raise InputError(
        f"unknown device {device!r}; expected one of {', '.join(DEVICE_FORMS)} (N: a CUDA device "
        "index, 0 for the first GPU)"
    )


def cuda_options(index: int = 0, gpu_mem_limit: int | None = None) -> dict[str, str]:
    """The CUDA provider's options for device `index`; `gpu_mem_limit` caps its memory arena, in
    bytes (None: no cap, onnxruntime's default). Values are strings, as onnxruntime reports them."""
    bad_type = isinstance(gpu_mem_limit, bool) or not isinstance(gpu_mem_limit, int)
    if gpu_mem_limit is not None and (bad_type or gpu_mem_limit < 1):
        raise InputError(f"gpu_mem_limit must be a positive number of bytes or None, not {gpu_mem_limit!r}")
    options = {"device_id": str(index), **CUDA_OPTIONS}
    if gpu_mem_limit is not None:
        options["gpu_mem_limit"] = str(gpu_mem_limit)
    return options


Providers = list[str | tuple[str, dict[str, str]]]  # onnxruntime's `providers=`: names, or (name, options)


def providers(device: Device, available: Iterable[str], gpu_mem_limit: int | None = None) -> Providers:
    """onnxruntime's `providers=` for a device: CUDA first (with its options) when asked for or
    'auto' and this onnxruntime offers it, the CPU always (for the nodes CUDA has no kernel for)."""
    options = cuda_options(device.index, gpu_mem_limit)  # checked on every machine, not only a GPU's
    if device.kind != "cpu" and CUDA in set(available):
        return [(CUDA, options), CPU]
    return [CPU]


def device_of(session_providers: list[str], provider_options: Mapping[str, Mapping[str, Any]]) -> str:
    """'cuda:N' or 'cpu': where a session runs, from its get_providers() and get_provider_options()."""
    if session_providers and session_providers[0] == CUDA:
        return f"cuda:{int(provider_options.get(CUDA, {}).get('device_id', 0))}"
    return "cpu"


@dataclass(frozen=True)
class NodePlacement:
    """One node of a profiled run and the provider that ran it; `elements`: its largest tensor."""

    name: str
    op_type: str
    provider: str
    elements: int

    @property
    def heavy(self) -> bool:
        """Real work (a loop body, or a tensor of HEAVY_ELEMENTS or more), not shape arithmetic,
        which onnxruntime's CUDA provider places on the CPU on purpose."""
        return self.op_type in CONTROL_FLOW or self.elements >= HEAVY_ELEMENTS

    def __str__(self) -> str:
        return f"{self.op_type} {self.name!r} ({self.elements:,} elements)"


def _elements(shapes: Any) -> int:
    """The most elements of any tensor in a profile's [{dtype: shape}, ...] list."""
    largest = 0
    for entry in shapes or []:
        for shape in entry.values() if isinstance(entry, dict) else []:
            n = 1
            for dim in shape:
                n *= int(dim)
            largest = max(largest, n)
    return largest


def read_placement(events: list[dict[str, Any]]) -> list[NodePlacement]:
    """Each node of an onnxruntime profile (SessionOptions.enable_profiling), once, in first-run
    order: nodes inside a Scan's body are listed once, not once per iteration."""
    seen: dict[str, NodePlacement] = {}
    for event in events:
        args = event.get("args") or {}
        name = str(event.get("name", ""))
        if event.get("cat") != "Node" or "provider" not in args or not name.endswith("_kernel_time"):
            continue
        name = name.removesuffix("_kernel_time")
        size = max(_elements(args.get("input_type_shape")), _elements(args.get("output_type_shape")))
        node = NodePlacement(name, str(args.get("op_name", "?")), str(args["provider"]), size)
        if name not in seen or seen[name].elements < size:
            seen[name] = node
    return list(seen.values())


def fallback_nodes(placement: list[NodePlacement], session_providers: list[str]) -> list[NodePlacement]:
    """The nodes that ran on the CPU although the session's first provider is CUDA (none on a CPU
    session: there the CPU is the choice, not a fallback)."""
    if not session_providers or session_providers[0] != CUDA:
        return []
    return [node for node in placement if node.provider == CPU]


def _libcuda() -> ctypes.CDLL | None:
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", ctypes.util.find_library("cuda")]
    for name in names:
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    return None


def cuda_free_memory(index: int) -> int | None:
    """Free memory of CUDA device `index` in bytes, from the CUDA driver (cuMemGetInfo in the
    device's primary context, the one onnxruntime uses; pushed and popped, so the calling thread's
    CUDA state is left as it was). None without an NVIDIA driver or on any driver error."""
    lib = _libcuda()
    if lib is None:
        return None
    device, context, popped = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p()
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    try:
        release = getattr(lib, "cuDevicePrimaryCtxRelease_v2", None) or lib.cuDevicePrimaryCtxRelease
        if lib.cuInit(0) or lib.cuDeviceGet(ctypes.byref(device), ctypes.c_int(index)):
            return None
        if lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device):
            return None
        try:
            if lib.cuCtxPushCurrent_v2(context):
                return None
            status = lib.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total))
            lib.cuCtxPopCurrent_v2(ctypes.byref(popped))
        finally:
            release(device)
    except AttributeError:  # a driver library without these entry points
        return None
    return None if status else int(free.value)
