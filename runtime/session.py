"""Load an exported model folder and explain images × prompts with onnxruntime. No torch.

    model = load("models/ViT-B-16__laion2b_s34b_b88k__448", device="auto")
    result = model.explain(["cat.jpg", "street.png"], ["a photo of a cat", "a remote control"])
    result.heatmaps        # float32 [B, P, H, W] in [0, 1]
    result.overlay(0, 1)   # PIL image: heatmap over the original image, at its own size

A supervised classifier's folder (metadata `classes`) is explained for classes instead of prompts:

    model.explain(["cat.jpg"], classes=["tabby cat", 281])   # names (or synonyms) and ids
    model.explain(["cat.jpg"], classes="top-3")               # each image's 3 most likely classes

Work is split into calls that fit a memory budget (images per call × prompts per call), so any
number of images and prompts runs in bounded memory; `explain_batches` yields results batch by
batch for streams too large to hold. One loaded model may be shared by many threads.

On a GPU (`device="cuda"`, `"cuda:N"`, or `"auto"` with onnxruntime-gpu) the calls go through IO
binding (device_io.py): each batch's pixels are uploaded once for all its prompt chunks, text
embeddings pass from the text graph to the image graph on the device, and outputs not asked for
(`layer_maps=False`) stay there. `model.devices` says where each graph runs and
`model.cpu_fallback_nodes()` which image-graph nodes onnxruntime left on the CPU.
"""

from __future__ import annotations

import logging
import shutil
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .classes import ClassIndex, parse_top_k, short_name
from .device_io import (
    BoundIO,
    PlainIO,
    io_for,
    preload_cuda_libraries,
    profiled_placement,
    profiling_options,
)
from .errors import DeviceFallbackWarning, ImageInputError, InputError, ModelFolderError, PromptError
from .metadata import (
    IMAGE_GRAPH,
    METADATA_FILE,
    TEXT_GRAPH,
    GraphSpec,
    ModelFolder,
    ModelMetadata,
    PreprocessCfg,
    default_tower,
    format_size,
    image_graph_spec,
)
from .preprocess import (
    DEFAULT_MAX_PIXELS,
    Placement,
    check_workers,
    default_workers,
    load_image,
    model_view,
    preprocess_into,
    run_each,
    to_original,
)
from .providers import (
    CPU,
    CUDA,
    NodePlacement,
    Providers,
    cuda_free_memory,
    device_of,
    fallback_nodes,
    missing_onnxruntime,
    parse_device,
    providers,
)
from .tokenizer import load_tokenizer
from .visualize import grid, layer_figure, overlay

try:
    import onnxruntime as ort
except ModuleNotFoundError as _exc:
    raise missing_onnxruntime(_exc) from None

__all__ = ["LeGradModel", "Explanation", "ImageFailure", "load", "session_options", "DEFAULT_MEMORY_BUDGET"]

log = logging.getLogger("legrad_runtime")

DEFAULT_MEMORY_BUDGET = 2 * 1024**3  # bytes of graph intermediates per onnxruntime call
GPU_BUDGET_SHARE = 0.5  # of the GPU's free memory at load (and of gpu_mem_limit): the default budget
PROMPT_LOOP_KEY = "prompt_loop"  # metadata.extra flag: the image graph scans over prompts inside
DEVICES = ("auto", "cpu", "cuda")  # the kinds; "cuda:N" names a GPU (providers.parse_device)
MAX_PROMPT_CHARS = 10_000  # CLIP reads 77 tokens; longer text only costs cleaning time
ImageSource = str | Path | Image.Image | np.ndarray
ClassRequest = str | int | Sequence[str | int] | np.ndarray  # names, ids, or 'top-K'


@dataclass(frozen=True)
class ImageFailure:
    """An input image that could not be explained, and why (the rest of its batch still is)."""

    index: int
    source: str
    error: ImageInputError


@dataclass(frozen=True)
class _Targets:
    """What one explain call explains: text embeddings (CLIP), class ids, or each image's top K."""

    names: list[str]  # the prompts' names: texts, class names, or 'top-1' ... 'top-K'
    text: np.ndarray | None = None  # (P, E) L2-normalised
    class_ids: np.ndarray | None = None  # (P,) int64
    top_k: int | None = None
    text_kept: Any = None  # `text` where the image graph reads it (a CUDA session: on the GPU), or None


@dataclass(frozen=True)
class _Plan:
    """How one explain call runs each batch: the targets' chunks, already where the graph reads them."""

    chunks: list[tuple[Any, int]]  # (values, count) per call of the image graph; empty for top-K
    memory_budget: int
    on_error: str
    layer_maps: bool


@dataclass
class Explanation:
    """LeGrad results for B images × P prompts. Row b is the b-th image that could be read.

    For a classifier the prompts are classes: `class_ids[b, p]` is the class of map (b, p) (the same
    row for every image when the classes were named; each image's own for 'top-K', whose prompts
    are then 'top-1' ... 'top-K'), `label(b, p)` its name, and the embeddings are None.
    """

    heatmaps: np.ndarray  # (B, P, H, W) float32 in [0, 1], on the model's input (image_size)
    layer_maps: np.ndarray | None  # (B, P, L, gh, gw) raw per-layer maps (grid_size); None: not asked for
    image_embeds: np.ndarray | None  # (B, E) L2-normalised; None for a classifier
    text_embeds: np.ndarray | None  # (P, E) L2-normalised; None for a classifier
    images: list[Image.Image]  # the originals, RGB, EXIF orientation applied
    placements: list[Placement]  # where each model input sits on its original image
    sources: list[str]  # a name for each row: file path or 'image #i'
    prompts: list[str]  # prompt texts ('embedding #p' for precomputed embeddings); class names
    layers: tuple[int, ...]
    logit_scale: float
    failures: list[ImageFailure]
    preprocess: PreprocessCfg  # how the images became the model's input
    logit_bias: float | None = None  # SigLIP's (sigmoid loss); None for CLIP (softmax over prompts)
    logits: np.ndarray | None = None  # (B, C) float32, a classifier's logits over all its classes
    class_ids: np.ndarray | None = None  # (B, P) int64, a classifier's class of each map
    class_names: tuple[str, ...] | None = None  # a classifier's C class names (metadata `classes`)

    @property
    def is_classifier(self) -> bool:
        return self.class_ids is not None

    def label(self, b: int, p: int) -> str:
        """The name of map (b, p): its class's name for a classifier, else prompt p."""
        if self.class_ids is None or self.class_names is None:
            return self.prompts[p]
        return self.class_names[int(self.class_ids[b, p])]

    @property
    def similarities(self) -> np.ndarray:
        """Cosine similarity of each image with each prompt, (B, P); a classifier's logit of each
        map's class."""
        if self.logits is not None and self.class_ids is not None:
            return np.take_along_axis(self.logits, self.class_ids, axis=1)
        if self.image_embeds is None or self.text_embeds is None:
            raise ValueError("this Explanation has neither embeddings nor a classifier's logits and classes")
        cosines: np.ndarray = self.image_embeds @ self.text_embeds.T
        return cosines

    @property
    def probabilities(self) -> np.ndarray:
        """Zero-shot probabilities (B, P), as the model was trained.

        Without a logit bias (CLIP, contrastive softmax loss): softmax over the prompts of
        logit_scale · cos; each row sums to 1. With one (SigLIP, sigmoid loss): for each
        (image, prompt) pair on its own, sigmoid(logit_scale · cos + logit_bias); rows need not
        sum to 1, and every prompt may be likely or none. A classifier's: the softmax over all
        C logits, at each map's class (rows sum to 1 only when P covers every class).
        """
        if self.logits is not None and self.class_ids is not None:
            z = self.logits.astype(np.float64)
            e = np.exp(z - z.max(axis=1, keepdims=True))
            probs = e / e.sum(axis=1, keepdims=True)
            return np.take_along_axis(probs, self.class_ids, axis=1).astype(np.float32)
        logits = self.logit_scale * self.similarities
        if self.logit_bias is None:
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            softmax: np.ndarray = e / e.sum(axis=1, keepdims=True)
            return softmax
        logits = logits + self.logit_bias
        e = np.exp(-np.abs(logits))  # in (0, 1]: never overflows, for either sign
        sigmoids: np.ndarray = np.where(logits >= 0, 1 / (1 + e), e / (1 + e))
        return sigmoids

    def heatmap_on_original(self, b: int, p: int) -> np.ndarray:
        """Heatmap of image b / prompt p mapped back onto the original image (its height, width):
        the resize undone, 0 where 'shortest' cropped, the padding of 'longest' dropped."""
        return to_original(self.heatmaps[b, p], self.placements[b])

    def overlay(
        self,
        b: int,
        p: int,
        cmap: str = "jet",
        alpha: float = 0.5,
        style: str = "overlay",
        caption: str | None = None,
    ) -> Image.Image:
        """Heatmap of image b / prompt p on the ORIGINAL image, at its own size, drawn in `style`:
        'overlay' (blended), 'contour' (the image untouched under the map's iso-lines) or
        'side-by-side' (the image, then the overlay); `caption`, a line of text under the picture."""
        return overlay(
            self.images[b],
            self.heatmap_on_original(b, p),
            cmap=cmap,
            alpha=alpha,
            style=style,
            caption=caption,
        )

    def layer_figure(self, b: int, p: int, cmap: str = "jet") -> Image.Image:
        """One panel per explained layer (the paper's layer-importance figure), on the model input:
        the picture the model saw (centre-cropped for 'shortest', padded for 'longest'), under maps of
        that same extent."""
        if self.layer_maps is None:
            raise InputError(
                "this Explanation has no layer maps (explained with layer_maps=False); explain again "
                "without it for the layer figure"
            )
        seen = model_view(self.images[b], self.preprocess)
        return layer_figure(seen, self.layer_maps[b, p], self.layers, self.label(b, p), cmap=cmap)

    def grid(self, cmap: str = "jet", cell: int = 224) -> Image.Image:
        """Images × prompts overlays with the prompts as headers and cosine scores as captions; for a
        classifier, class names as headers and probabilities as captions (each cell's class and
        probability for 'top-K')."""
        maps = [
            [self.heatmap_on_original(b, p) for p in range(len(self.prompts))]
            for b in range(len(self.images))
        ]
        if not self.is_classifier:
            return grid(self.images, maps, self.prompts, scores=self.similarities, cmap=cmap, cell=cell)
        probs = self.probabilities
        shared = self.class_ids is not None and bool((self.class_ids == self.class_ids[:1]).all())
        headers = [short_name(self.label(0, p)) for p in range(len(self.prompts))] if shared else self.prompts
        captions = [
            [
                f"{probs[b, p]:.3f}" if shared else f"{short_name(self.label(b, p))} {probs[b, p]:.3f}"
                for p in range(len(self.prompts))
            ]
            for b in range(len(self.images))
        ]
        return grid(self.images, maps, headers, captions=captions, cmap=cmap, cell=cell)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """onnxruntime options tuned for throughput (see benchmarks/README.md for the measurements).

    Every graph optimisation (EXTENDED measured 6% slower); one op at a time, each using
    `threads` cores (None: all physical cores); CPU arena and memory pattern on (no arena
    measured 6% slower). Spinning and an explicit thread count made no measurable difference.
    """
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads must be a positive integer or None, not {threads!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = True
    return options


def _warn_fallback(device: str, reason: str) -> None:
    message = (
        f"device={device!r} was asked for, but {reason}; running on CPU instead, which is much slower. "
        "Install onnxruntime-gpu (pip install legrad-onnx[gpu]) with a matching CUDA, or pass device='cpu'"
    )
    warnings.warn(message, DeviceFallbackWarning, stacklevel=4)  # one warning; callers log it if they like


_EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
_ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}


def _check_graph(session: ort.InferenceSession, spec: GraphSpec, meta: ModelMetadata) -> None:
    """The graph's own input and output shapes agree with the metadata (ModelFolderError if not)."""
    image_size, grid_size = list(meta.image_size), list(meta.grid_size)  # [height, width], [gh, gw]
    sizes = {  # symbolic axis → (metadata field, its value as written, this axis's length)
        "height": ("image_size", image_size, image_size[0]),
        "width": ("image_size", image_size, image_size[1]),
        "embed_dim": ("embed_dim", meta.embed_dim, meta.embed_dim),
        "layers": ("layers", len(meta.layers), len(meta.layers)),
        "grid_h": ("grid_size", grid_size, grid_size[0]),
        "grid_w": ("grid_size", grid_size, grid_size[1]),
    }
    if meta.tokenizer is not None:
        sizes["context_length"] = ("tokenizer.context_length",) + (meta.tokenizer.context_length,) * 2
    found = {t.name: t for t in session.get_inputs()} | {t.name: t for t in session.get_outputs()}
    for want in spec.inputs + spec.outputs:
        have = found.get(want.name)
        if have is None or have.type != _ORT_TYPES[want.dtype] or len(have.shape) != len(want.shape):
            shown = "missing" if have is None else f"{have.type} {have.shape}"
            raise ModelFolderError(
                f"{spec.filename} does not have the {want.name!r} tensor a legrad graph has "
                f"({want.dtype} {list(want.shape)}; found {shown}); re-export the model"
            )
        for axis, dim in zip(want.shape, have.shape):
            if isinstance(axis, int) and dim != axis or axis in spec.dynamic_axes and isinstance(dim, int):
                raise ModelFolderError(
                    f"{spec.filename} tensor {want.name!r} has shape {have.shape}, not {list(want.shape)}; "
                    "re-export the model"
                )
            if isinstance(axis, str) and axis in sizes and dim != sizes[axis][2]:
                name, value, _ = sizes[axis]
                raise ModelFolderError(
                    f"{METADATA_FILE} field {name!r} = {value} disagrees with {spec.filename}, whose "
                    f"{want.name!r} has shape {have.shape}; re-export the model"
                )


class LeGradModel:
    """An exported LeGrad model: image graph, text graph and tokenizer, ready for many threads.

    A classifier's folder has the image graph only (class ids in, logits out): `is_classifier`,
    `classes` its class names, `class_index` their lookup, and no tokenizer (`tokenizer` is None).

    `devices` says where each graph runs ({"image": "cuda:0", "text": "cuda:0"}, or "cpu"),
    `device` the image graph's kind ('cuda' or 'cpu'), `memory_budget` the budget of calls that name
    none, and `cpu_fallback_nodes()` the image-graph nodes onnxruntime left on the CPU.
    """

    def __init__(
        self,
        folder: str | Path,
        device: str = "auto",
        verify: bool = True,
        threads: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        gpu_mem_limit: int | None = None,
        memory_budget: int | None = None,
        image_workers: int | None = None,
    ):
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
            raise InputError(f"max_pixels must be a positive integer, not {max_pixels!r}")
        if memory_budget is not None:
            _check_budget(memory_budget)
        # threads that decode, resize and normalise a batch's images (1: the calling thread only)
        self.image_workers = default_workers() if image_workers is None else check_workers(image_workers)
        wanted = parse_device(device)
        available = ort.get_available_providers()
        chosen = providers(wanted, available, gpu_mem_limit)  # also checks gpu_mem_limit
        session_options(threads)  # checks threads before any file is read
        self.max_pixels = max_pixels
        files = ModelFolder(folder, verify=verify)
        self.folder = files.path
        self.metadata: ModelMetadata = files.metadata
        self._image_spec = image_spec = image_graph_spec(self.metadata)
        self._profile: str | None = None  # the profile folder of the image session's first run (CUDA)
        self._image, failure = self._session(files, image_spec, chosen, threads)
        if failure is not None or self._image.get_providers()[0] != CUDA:
            chosen = [CPU]  # the text graph goes straight to the CPU: one failure, one warning
        self._text: ort.InferenceSession | None = None
        self.tokenizer = None
        self.class_index = None if self.metadata.classes is None else ClassIndex(self.metadata.classes)
        if self.metadata.tokenizer is None:  # a classifier: nothing more to open
            files.verify_others(read=[image_spec.filename])
        else:
            self._text, _ = self._session(files, TEXT_GRAPH, chosen, threads)
            self.tokenizer = load_tokenizer(self.folder, self.metadata.tokenizer, read=files.read_bytes)
            opened = [image_spec.filename, TEXT_GRAPH.filename, *self.metadata.tokenizer.files]
            files.verify_others(read=opened)
        self._image_io: PlainIO | BoundIO = io_for(self._image)
        self._text_io = None if self._text is None else io_for(self._text)
        sessions = {"image": self._image, "text": self._text}
        self.devices: dict[str, str] = {  # where each graph runs: 'cuda:N' or 'cpu'
            role: device_of(s.get_providers(), s.get_provider_options())
            for role, s in sessions.items()
            if s is not None
        }
        self.device = "cuda" if self.devices["image"] != "cpu" else "cpu"
        log.info("%s: %s", self.folder.name, ", ".join(f"{k} graph on {v}" for k, v in self.devices.items()))
        if wanted.kind != "cpu" and chosen[0] == CPU and CUDA in available:
            failure = failure or "the CUDA provider failed to start (missing CUDA / cuDNN libraries?)"
        if wanted.kind == "cuda" and self.device == "cpu":
            _warn_fallback(str(wanted), failure or f"this onnxruntime offers only {', '.join(available)}")
        elif failure is not None:  # 'auto': the CPU is an accepted answer, but say why CUDA was not
            log.warning("device='auto' runs on the CPU: %s", failure)
        self._cpu_nodes = self._check_placement()
        self.memory_budget = memory_budget or self._default_memory_budget(gpu_mem_limit)

    def _session(
        self, files: ModelFolder, spec: GraphSpec, chosen: Providers, threads: int | None
    ) -> tuple[ort.InferenceSession, str | None]:
        """One graph's session from the checked bytes; by path only when it has external weights
        (listed, hence checksummed; onnxruntime keeps their paths inside the folder).

        On CUDA: the image graph's session profiles its first run (_check_placement), and a CUDA
        provider that fails to start gives a CPU session and the reason, for one warning. A graph
        the CPU cannot load either is a ModelFolderError.
        """
        if f"{spec.filename}.data" in self.metadata.files:
            model: str | bytes = str(self.folder / spec.filename)
        else:
            model = files.read_bytes(spec.filename)
        failure = None
        if chosen[0] != CPU:
            preload_cuda_libraries()
            options = self._options(threads)
            profile = profiling_options(options) if spec is self._image_spec else None
            try:  # enable_fallback=0: onnxruntime neither prints nor retries on its own; we do, once
                session = ort.InferenceSession(model, options, providers=chosen, enable_fallback=0)
            except Exception as exc:  # onnxruntime's own exception types are not importable by a stable name
                failure = f"the CUDA provider failed to start ({type(exc).__name__}: {str(exc)[:300]})"
                if profile is not None:
                    shutil.rmtree(profile, ignore_errors=True)
            else:
                try:
                    _check_graph(session, spec, self.metadata)
                except ModelFolderError:
                    if profile is not None:
                        shutil.rmtree(profile, ignore_errors=True)
                    raise
                if profile is not None:
                    self._profile = profile
                return session, None
        try:
            session = ort.InferenceSession(model, self._options(threads), providers=[CPU])
        except Exception as exc:  # onnxruntime's own exception types are not importable by a stable name
            raise ModelFolderError(
                f"{spec.filename} in {self.folder} is not a graph onnxruntime can load "
                f"({type(exc).__name__}: {str(exc)[:300]}); re-export the model"
            ) from None
        _check_graph(session, spec, self.metadata)
        return session, failure

    def _options(self, threads: int | None) -> ort.SessionOptions:
        options = session_options(threads)
        # external data named inside a graph given as bytes resolves in the folder, never in the cwd
        options.add_session_config_entry(_EXTERNAL_DATA_FOLDER, str(self.folder))
        return options

    def _warmup_feeds(self) -> dict[str, np.ndarray]:
        """One image and one prompt (or class 0): the smallest call of the image graph."""
        m = self.metadata
        feeds: dict[str, np.ndarray] = {"pixel_values": np.zeros((1, 3, *m.image_size), np.float32)}
        if m.is_classifier:
            feeds["class_ids"] = np.zeros(1, np.int64)
        else:
            feeds["text_embeds"] = np.eye(1, m.embed_dim, dtype=np.float32)
        return feeds

    def _check_placement(self) -> list[NodePlacement]:
        """Where onnxruntime placed each image-graph node, from the session's first run (profiled,
        then profiling ended; it also warms the GPU up). Nodes left on the CPU are logged: heavy ones
        (loop bodies, large tensors) as a warning, since each costs copies and CPU time per call."""
        folder, self._profile = self._profile, None
        if folder is None:
            return []
        if self.device == "cpu":  # CUDA was dropped as the session started: nothing to check
            self._image.end_profiling()
            shutil.rmtree(folder, ignore_errors=True)
            return []
        placement = profiled_placement(self._image, self._warmup_feeds(), folder)
        nodes = fallback_nodes(placement, self._image.get_providers())
        heavy = [n for n in nodes if n.heavy]
        if heavy:
            log.warning(
                "%d heavy node(s) of %s run on the CPU, not %s (onnxruntime's CUDA provider has no "
                "kernel for them): %s",
                len(heavy),
                self._image_spec.filename,
                self.devices["image"],
                "; ".join(map(str, heavy)),
            )
        if len(nodes) > len(heavy):
            log.info(
                "%d shape node(s) of %s run on the CPU, as onnxruntime places them on purpose: %s",
                len(nodes) - len(heavy),
                self._image_spec.filename,
                "; ".join(str(n) for n in nodes if not n.heavy),
            )
        return nodes

    def cpu_fallback_nodes(self, heavy_only: bool = False) -> list[NodePlacement]:
        """Image-graph nodes onnxruntime placed on the CPU although the graph runs on CUDA, from the
        profiled first run at load; `heavy_only`: only real work (NodePlacement.heavy), not the shape
        arithmetic onnxruntime keeps on the CPU on purpose. Always empty for a CPU model."""
        return [n for n in self._cpu_nodes if n.heavy or not heavy_only]

    def _default_memory_budget(self, gpu_mem_limit: int | None) -> int:
        """The memory budget when a call names none. CPU: DEFAULT_MEMORY_BUDGET. CUDA: a share
        (GPU_BUDGET_SHARE) of the GPU's free memory read at load, after the weights and a first run,
        and of gpu_mem_limit if set; DEFAULT_MEMORY_BUDGET if the free memory cannot be read (no
        CUDA driver library) and no limit is set."""
        if self.device == "cpu":
            return DEFAULT_MEMORY_BUDGET
        free = cuda_free_memory(int(self.devices["image"].partition(":")[2]))
        shares = [int(GPU_BUDGET_SHARE * n) for n in (free, gpu_mem_limit) if n]
        return max(1, min(shares)) if shares else DEFAULT_MEMORY_BUDGET

    def __repr__(self) -> str:
        m = self.metadata
        kind = f", {len(m.classes):,} classes" if m.classes is not None else ""
        return (
            f"LeGradModel({m.model_name!r}, pretrained={m.pretrained!r}, size={format_size(m.image_size)}"
            f"{kind}, device={self.device!r})"
        )

    @property
    def is_classifier(self) -> bool:
        """Whether this is a supervised classifier (explained for classes, not text prompts)."""
        return self.metadata.is_classifier

    @property
    def classes(self) -> tuple[str, ...] | None:
        """A classifier's class names, one per logit, in id order; None for a CLIP model."""
        return self.metadata.classes

    # ------------------------------------------------------------------ prompts

    def embed_text(self, prompts: str | Sequence[str], batch_size: int = 64) -> np.ndarray:
        """L2-normalised text embeddings (P, E) for the prompts."""
        return self._embed_text(prompts, batch_size)[0]

    def _embed_text(self, prompts: str | Sequence[str], batch_size: int = 64) -> tuple[np.ndarray, Any]:
        """The embeddings, and, when one text call makes them all, that call's output where the image
        graph reads it (on a GPU: left there, so it reaches the image graph without the host)."""
        if self._text_io is None or self.tokenizer is None:
            raise PromptError(
                f"{self.folder} is a classifier: it has no text tower to embed prompts; explain it for "
                "classes instead, e.g. classes=['tabby cat', 281] or classes='top-5'"
            )
        prompts = _check_prompts(prompts)
        (name,), (out,) = TEXT_GRAPH.input_names, TEXT_GRAPH.output_names
        keep = [out] if len(prompts) <= batch_size and self._text_fits_image() else []
        chunks, kept = [], None
        for start in range(0, len(prompts), batch_size):
            ids = self.tokenizer(prompts[start : start + batch_size])
            got, held = self._text_io.run({name: ids}, host=[out], keep=keep, sizes={"prompts": len(ids)})
            chunks.append(got[out])
            kept = held.get(out)
        return np.concatenate(chunks).astype(np.float32), kept

    def _text_fits_image(self) -> bool:
        """Whether the text graph's output can be the image graph's input as it is (same element
        type; an fp16 text graph's goes through the host, cast to float32)."""
        if self._text is None:
            return False
        wanted = {i.name: i.type for i in self._image.get_inputs()}.get(IMAGE_GRAPH.input_names[1])
        return bool(self._text.get_outputs()[0].type == wanted)

    def _text_embeds(
        self, prompts: str | Sequence[str] | None, text_embeds: np.ndarray | None
    ) -> tuple[np.ndarray, Any, list[str]]:
        if prompts is None and text_embeds is None:
            raise PromptError(
                "no prompts given; pass prompts (texts, e.g. 'a photo of a cat') or text_embeds"
            )
        if prompts is not None and text_embeds is not None:
            raise PromptError("pass either prompts (texts) or text_embeds (precomputed embeddings), not both")
        if prompts is not None:
            names = _check_prompts(prompts)
            return *self._embed_text(names), names
        emb = _check_embeddings(text_embeds, self.metadata.embed_dim)
        return emb, None, [f"embedding #{p}" for p in range(len(emb))]

    def _targets(
        self,
        prompts: str | Sequence[str] | None,
        text_embeds: np.ndarray | None,
        classes: ClassRequest | None,
    ) -> _Targets:
        """What each map explains: text embeddings (CLIP), class ids, or each image's top K classes."""
        if self.class_index is None:
            if classes is not None:
                raise PromptError(
                    f"{self.folder} is a CLIP model: it is explained for text prompts, not classes; pass "
                    "prompts, e.g. ['a photo of a cat'] (classes= is for supervised classifiers)"
                )
            text, kept, names = self._text_embeds(prompts, text_embeds)
            return _Targets(names, text=text, text_kept=kept)
        if prompts is not None or text_embeds is not None:
            given = "prompts" if prompts is not None else "text_embeds"
            raise PromptError(
                f"{self.folder} is a classifier: it is explained for its classes, not {given}; pass "
                "classes=, e.g. classes=['tabby cat', 281] or classes='top-5'"
            )
        if classes is None:
            raise PromptError(
                "no classes given; this classifier needs classes=, e.g. classes=['tabby cat', 281] "
                "(names or ids) or classes='top-5' (each image's 5 most likely)"
            )
        k = parse_top_k(classes, len(self.class_index))
        if k is not None:
            return _Targets([f"top-{i + 1}" for i in range(k)], top_k=k)
        ids = self.class_index.resolve(classes)
        return _Targets([self.class_index.names[i] for i in ids], class_ids=np.asarray(ids, np.int64))

    # ------------------------------------------------------------------ images

    @property
    def prompts_in_graph_loop(self) -> bool:
        """Whether the image graph loops over prompts inside (the exporter flags it in metadata.extra).

        Such a graph holds one prompt's backward at a time: its memory hardly grows with P, so
        prompts are split across calls (which repeats the image forward) only for huge P.
        """
        return bool(self.metadata.extra.get(PROMPT_LOOP_KEY, False))

    def chunk_sizes(self, num_prompts: int, batch_size: int | None, memory_budget: int) -> tuple[int, int]:
        """(images per call, prompts per call) whose graph intermediates fit the memory budget.

        Counted in float32 with every explained layer alive; N = gh·gw + prefix tokens, and a
        heatmap has H·W pixels. Per image: the forward (attention and token stream), the per-layer
        traces the backward keeps (three token × MLP-width tensors and four token × width ones), and
        one prompt's backward per layer (the attention gradient, heads × N², twice for its ReLU, and
        the MLP's token × MLP-width gradient). Per (image, prompt): the heatmap outputs and their
        normalisation temporaries. Graphs without the prompt loop (`legrad-export --prompts batch`,
        and older exports) hold every prompt's backward at once: per (image, prompt) it is the
        attention gradient and a few token × width tensors per layer (ViT-B-16 at 224 on the CPU:
        7 MB measured, 18 MB counted).

        MAP-head towers (SigLIP) explain the head's attention, one query over the N tokens: the
        forward is the same, but each explained layer's trace is the head's keys and values (a few
        token × width tensors and heads × N), and a prompt's backward through the head is
        heads × N (twice for its ReLU) and a few width and MLP-width vectors, per layer. With the
        empty-prompt correction, each image carries one prompt more.
        """
        m = self.metadata
        tower = m.tower or default_tower(m.grid_size)  # never None: ModelMetadata fills it in
        (gh, gw), (ih, iw) = m.grid_size, m.image_size
        n, d, layers, s2 = gh * gw + tower.prefix_tokens, m.width, len(m.layers), ih * iw
        hn2 = m.heads * n * n
        if tower.head in ("map", "attn_pool"):  # CoCa's pooler: the same shape, cheaper
            hn = m.heads * n
            trace = 4 * n * d + hn  # per explained layer: the head's normed input, keys, values, attention
            backward = 2 * hn + 8 * d  # one prompt through the head, per layer
            forward = 2 * hn2 + 16 * n * d + 3 * s2
            if self.prompts_in_graph_loop:
                per_image = 4 * (forward + layers * (trace + backward))
                per_pair = 4 * (3 * s2 + 2 * layers * n)
            else:
                per_image = 4 * (forward + layers * trace)
                per_pair = 4 * (3 * s2 + layers * (backward + 2 * n))
            if m.correction is not None and m.correction.enabled:
                per_image += per_pair  # the empty prompt rides along in every call
        elif self.prompts_in_graph_loop:
            per_layer = 16 * n * d + 2 * hn2 + 4 * n * d + 3 * n * d  # traces + one prompt's backward
            per_image = 4 * (2 * hn2 + 16 * n * d + 3 * s2 + layers * per_layer)
            per_pair = 4 * (3 * s2 + 2 * layers * n)
        else:
            per_image = 4 * (hn2 + 8 * n * d + 3 * s2)
            per_pair = 4 * layers * (hn2 + 12 * n * d) + 4 * s2
        images = batch_size or max(1, min(32, memory_budget // (per_image + per_pair * num_prompts)))
        prompts = max(1, min(num_prompts, (memory_budget - images * per_image) // max(1, images * per_pair)))
        return images, prompts

    def explain_batches(
        self,
        images: Iterable[ImageSource],
        prompts: str | Sequence[str] | None = None,
        *,
        text_embeds: np.ndarray | None = None,
        classes: ClassRequest | None = None,
        batch_size: int | None = None,
        memory_budget: int | None = None,
        on_error: str = "raise",
        layer_maps: bool = True,
    ) -> Iterator[Explanation]:
        """Yield one Explanation per batch of images (bounded memory for any number of images).

        A CLIP model takes `prompts` (texts) or `text_embeds`; a classifier takes `classes`: class
        names (or synonyms, any case) and ids, mixed, or 'top-K' for each image's K most likely
        classes (in descending probability). on_error='raise' stops at the first unreadable image
        with an ImageInputError naming it; 'skip' leaves it out and records it in the batch's
        `failures`. `memory_budget`: bytes of graph intermediates per call (None: the model's
        `memory_budget`, from the GPU's free memory on CUDA). `layer_maps=False` leaves the per-layer
        maps out (`layer_maps` is None; on a GPU they are not copied back).
        """
        if on_error not in ("raise", "skip"):
            raise InputError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise InputError(f"batch_size must be a positive integer, not {batch_size!r}")
        budget = self.memory_budget if memory_budget is None else _check_budget(memory_budget)
        targets = self._targets(prompts, text_embeds, classes)
        per_call, prompts_per_call = self.chunk_sizes(len(targets.names), batch_size, budget)
        plan = _Plan(self._target_chunks(targets, prompts_per_call), budget, on_error, bool(layer_maps))
        batch: list[tuple[int, ImageSource]] = []
        for index, source in enumerate(images):
            batch.append((index, source))
            if len(batch) == per_call:
                yield self._explain_batch(batch, targets, plan)
                batch = []
        if batch:
            yield self._explain_batch(batch, targets, plan)

    def _chunks(self, values: np.ndarray, per_call: int) -> list[tuple[Any, int]]:
        """`values` (P, ...) in calls of `per_call`, each put where the image graph reads it."""
        parts = [values[i : i + per_call] for i in range(0, len(values), per_call)]
        return [(self._image_io.put(part), len(part)) for part in parts]

    def _target_chunks(self, targets: _Targets, per_call: int) -> list[tuple[Any, int]]:
        """The named targets in calls, put on the device once for every batch of this explain call;
        the text graph's output as it is when one call takes every prompt. Top-K: none yet."""
        if targets.text is not None:
            if targets.text_kept is not None and per_call >= len(targets.text):
                return [(targets.text_kept, len(targets.text))]
            return self._chunks(targets.text, per_call)
        if targets.class_ids is not None:
            return self._chunks(targets.class_ids, per_call)
        return []

    def explain(
        self,
        images: ImageSource | Sequence[ImageSource],
        prompts: str | Sequence[str] | None = None,
        *,
        classes: ClassRequest | None = None,
        **kwargs: Any,
    ) -> Explanation:
        """Explain every image for every prompt (a classifier: every class); see `explain_batches`."""
        many = [images] if isinstance(images, (str, Path, Image.Image, np.ndarray)) else images
        if len(many) == 0:
            raise ImageInputError("no images given; pass at least one path, PIL image or uint8 array")
        parts = list(self.explain_batches(many, prompts, classes=classes, **kwargs))
        return _concat(parts)

    def _explain_batch(
        self, batch: list[tuple[int, ImageSource]], targets: _Targets, plan: _Plan
    ) -> Explanation:
        pixels, originals, placements, sources, failures = self._load_batch(batch, plan.on_error)
        m = self.metadata
        names = targets.names
        heat: np.ndarray
        layer_maps: np.ndarray | None
        embeds: np.ndarray
        class_ids: np.ndarray | None = None
        if len(pixels) and targets.text is not None:
            x = self._image_io.put(pixels)  # once, for every prompt chunk
            heat, layer_maps, embeds = self._run(x, len(pixels), "text_embeds", plan.chunks, plan.layer_maps)
            self._check_finite(sources, heat, layer_maps, embeds)
        elif len(pixels):
            heat, layer_maps, embeds, class_ids = self._run_classes(pixels, targets, plan, sources)
        else:  # every image of this batch failed: zero rows, same shapes
            heat = np.zeros((0, len(names), *m.image_size), np.float32)
            layer_maps = np.zeros((0, len(names), len(m.layers), *m.grid_size), np.float32)
            layer_maps = layer_maps if plan.layer_maps else None
            embeds = np.zeros((0, m.embed_dim), np.float32)
            class_ids = None if targets.text is not None else np.zeros((0, len(names)), np.int64)
        classifier = targets.text is None
        return Explanation(
            heatmaps=heat,
            layer_maps=layer_maps,
            image_embeds=None if classifier else embeds,
            text_embeds=targets.text,
            images=originals,
            placements=placements,
            sources=sources,
            prompts=list(names),
            layers=tuple(m.layers),
            logit_scale=m.logit_scale,
            logit_bias=m.logit_bias,
            preprocess=m.preprocess,
            failures=failures,
            logits=embeds if classifier else None,
            class_ids=class_ids,
            class_names=m.classes,
        )

    def _load_batch(
        self, batch: list[tuple[int, ImageSource]], on_error: str
    ) -> tuple[np.ndarray, list[Image.Image], list[Placement], list[str], list[ImageFailure]]:
        """A batch's images decoded and preprocessed straight into one (n, 3, H, W) array, each into
        its own row, on `image_workers` threads: the pixel values, the originals (RGB), placements
        and names of the n images that could be read, and the failures (on_error='skip'; 'raise'
        raises the first failure in input order, as one thread would)."""
        cfg = self.metadata.preprocess
        labels = [str(s) if isinstance(s, (str, Path)) else f"image #{i}" for i, s in batch]
        buffer = np.empty((len(batch), 3, *cfg.size), np.float32)

        def fatal(exc: BaseException) -> bool:
            return on_error == "raise" or not isinstance(exc, ImageInputError)

        def prepare(k: int) -> tuple[Image.Image, Placement]:
            source = batch[k][1]
            is_path = isinstance(source, (str, Path))
            image = load_image(source, name=None if is_path else labels[k], max_pixels=self.max_pixels)
            placement = preprocess_into(image, cfg, buffer[k])
            # preprocess needs the native mode; pictures need RGB (an RGB image is kept: it is already
            # load_image's own copy, never the caller's)
            return (image if image.mode == "RGB" else image.convert("RGB")), placement

        rows: list[int] = []
        originals: list[Image.Image] = []
        placements: list[Placement] = []
        sources: list[str] = []
        failures: list[ImageFailure] = []
        for k, outcome in enumerate(run_each(prepare, len(batch), self.image_workers, stop=fatal)):
            if isinstance(outcome, Exception):
                if fatal(outcome):
                    raise outcome
                assert isinstance(outcome, ImageInputError)
                failures.append(ImageFailure(batch[k][0], labels[k], outcome))
                continue
            original, placement = outcome
            rows.append(k)
            originals.append(original)
            placements.append(placement)
            sources.append(labels[k])
        pixels = buffer if len(rows) == len(batch) else buffer[rows]
        return pixels, originals, placements, sources, failures

    def _run(
        self, x: Any, batch: int, name: str, chunks: list[tuple[Any, int]], layer_maps: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """The image graph on the `batch` images x (put on its device) for each chunk of targets (text
        embeddings or class ids): heatmaps, layer maps (None unless asked for), and the third output
        (image embeddings or logits, taken from the first call)."""
        heat, maps, third = self._image_spec.output_names
        runs = [
            self._image_io.run(
                {"pixel_values": x, name: values},
                host=[heat, *([maps] if layer_maps else []), *([third] if i == 0 else [])],
                sizes={"batch": batch, "prompts": n},
            )[0]
            for i, (values, n) in enumerate(chunks)
        ]
        layers = _join([r[maps] for r in runs]) if layer_maps else None
        return _join([r[heat] for r in runs]), layers, runs[0][third]

    def _run_classes(
        self, pixels: np.ndarray, targets: _Targets, plan: _Plan, sources: list[str]
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
        """A classifier's maps for the named classes, or for each image's top K: the logits of a first
        run pick them, and one more run explains the batch's union of them (the pixels put on the
        device once for both)."""
        x, batch = self._image_io.put(pixels), len(pixels)
        if targets.class_ids is not None:
            heat, layer_maps, logits = self._run(x, batch, "class_ids", plan.chunks, plan.layer_maps)
            self._check_finite(sources, heat, layer_maps, logits)
            return heat, layer_maps, logits, np.tile(targets.class_ids, (batch, 1))
        third = self._image_spec.output_names[2]
        any_class = self._image_io.put(np.zeros(1, np.int64))
        feeds = {"pixel_values": x, "class_ids": any_class}
        logits = self._image_io.run(feeds, host=[third], sizes={"batch": batch, "prompts": 1})[0][third]
        self._check_finite(sources, logits)
        top = np.argsort(-logits, axis=1, kind="stable")[:, : targets.top_k].astype(np.int64)  # (B, K)
        union = np.unique(top)  # sorted ids; every image's top K among them
        per_call = self.chunk_sizes(len(union), batch, plan.memory_budget)[1]
        heat, layer_maps, _ = self._run(x, batch, "class_ids", self._chunks(union, per_call), plan.layer_maps)
        self._check_finite(sources, heat, layer_maps)
        where = np.searchsorted(union, top)  # (B, K): each image's classes in the union
        heat = np.take_along_axis(heat, where[:, :, None, None], axis=1)
        if layer_maps is not None:
            layer_maps = np.take_along_axis(layer_maps, where[:, :, None, None, None], axis=1)
        return heat, layer_maps, logits, top

    def _check_finite(self, sources: list[str], *outputs: np.ndarray | None) -> None:
        if not all(np.isfinite(out).all() for out in outputs if out is not None):
            raise ModelFolderError(
                f"the image graph of {self.folder} gave NaN or infinite values for {', '.join(sources)}; "
                "its weights are broken: re-export the model"
            )


def load(
    folder: str | Path,
    device: str = "auto",
    verify: bool = True,
    threads: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    gpu_mem_limit: int | None = None,
    memory_budget: int | None = None,
    image_workers: int | None = None,
) -> LeGradModel:
    """Load an exported model folder: metadata validated, every file inside it and (unless
    verify=False) matching its sha256, each graph's shapes agreeing with the metadata.

    `threads`: CPU cores each onnxruntime call may use (None: all physical cores).
    `max_pixels`: the most pixels an input image may decode to (larger JPEGs are decoded at
    a reduced scale, other formats refused before decoding).
    `device`: 'auto' (CUDA when onnxruntime offers it), 'cpu', 'cuda' or 'cuda:N' (the N-th GPU);
    CUDA asked for but unusable gives one DeviceFallbackWarning and the CPU.
    `gpu_mem_limit`: bytes the CUDA provider's memory arena may hold (None: no cap); the default
    memory budget is then half of it at most.
    `memory_budget`: bytes of graph intermediates per onnxruntime call for explain calls that name
    none (None: DEFAULT_MEMORY_BUDGET on the CPU, a share of the GPU's free memory on CUDA); a
    smaller budget splits the work into more, smaller calls, with the same maps.
    `verify=False` skips the checksums and the check that the folder holds no file its metadata does
    not list (for a folder you trust); every path is still checked to stay inside the folder.
    `image_workers`: threads that decode, resize and normalise each batch's images (None: min(8, CPU
    count); 1: none, all on the calling thread); the pixel values are the same for any number.
    """
    return LeGradModel(
        folder,
        device=device,
        verify=verify,
        threads=threads,
        max_pixels=max_pixels,
        gpu_mem_limit=gpu_mem_limit,
        memory_budget=memory_budget,
        image_workers=image_workers,
    )


def _check_budget(memory_budget: object) -> int:
    """A memory budget as given, if it is a positive integer (bytes); InputError otherwise."""
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
        raise InputError(f"memory_budget must be a positive integer (bytes), not {memory_budget!r}")
    return memory_budget


def _check_prompts(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a string or a list of strings, not {type(prompts).__name__}")
    if len(prompts) == 0:
        raise PromptError("the prompt list is empty; pass at least one prompt, e.g. ['a photo of a cat']")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt #{i} is {type(p).__name__}, not a string")
        if not "".join(ch for ch in p if unicodedata.category(ch)[0] not in "CZ"):
            raise PromptError(
                f"prompt #{i} is empty (or only spaces and control characters); every prompt needs some "
                "text, e.g. 'a photo of a cat'"
            )
        if len(p) > MAX_PROMPT_CHARS:
            raise PromptError(
                f"prompt #{i} is {len(p):,} characters long; at most {MAX_PROMPT_CHARS:,} are read "
                "(CLIP reads 77 tokens)"
            )
    return list(prompts)


def _check_embeddings(text_embeds: Any, embed_dim: int) -> np.ndarray:
    try:
        emb = np.asarray(text_embeds, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PromptError(
            f"text_embeds is not a numeric array ({exc}); pass float (P, {embed_dim})"
        ) from None
    if emb.ndim == 1:
        emb = emb[None]
    if emb.ndim != 2 or emb.shape[1] != embed_dim:
        raise PromptError(f"text_embeds has shape {tuple(emb.shape)}; this model needs (P, {embed_dim})")
    if emb.shape[0] == 0:
        raise PromptError("text_embeds is empty; pass at least one embedding")
    if not np.isfinite(emb).all():
        raise PromptError("text_embeds has NaN or infinite values; they cannot be normalised")
    scale = np.abs(emb).max(axis=1, keepdims=True)  # scaled first, so 1e30 does not overflow the norm
    if (scale == 0).any():
        raise PromptError("text_embeds has rows that are all zero; they cannot be normalised")
    emb = emb / scale
    unit: np.ndarray = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    return unit


def _join(chunks: list[np.ndarray]) -> np.ndarray:
    """Prompt chunks' outputs side by side (axis 1); one chunk as it is, not copied."""
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks, 1)


def _concat(parts: list[Explanation]) -> Explanation:
    first = parts[0]
    if len(parts) == 1:
        return first

    def rows(name: str) -> np.ndarray | None:
        arrays = [getattr(p, name) for p in parts]
        return None if arrays[0] is None else np.concatenate(arrays)

    return Explanation(
        heatmaps=np.concatenate([p.heatmaps for p in parts]),
        layer_maps=rows("layer_maps"),
        image_embeds=rows("image_embeds"),
        text_embeds=first.text_embeds,
        images=[im for p in parts for im in p.images],
        placements=[pl for p in parts for pl in p.placements],
        sources=[s for p in parts for s in p.sources],
        prompts=first.prompts,
        layers=first.layers,
        logit_scale=first.logit_scale,
        logit_bias=first.logit_bias,
        preprocess=first.preprocess,
        failures=[f for p in parts for f in p.failures],
        logits=rows("logits"),
        class_ids=rows("class_ids"),
        class_names=first.class_names,
    )
