"""Load an exported model folder and explain images × prompts with onnxruntime. No torch.

    model = load("models/ViT-B-16__laion2b_s34b_b88k__448", device="auto")
    result = model.explain(["cat.jpg", "street.png"], ["a photo of a cat", "a remote control"])
    result.heatmaps        # float32 [B, P, H, W] in [0, 1]
    result.overlay(0, 1)   # PIL image: heatmap over the original image, at its own size

Work is split into calls that fit a memory budget (images per call × prompts per call), so any
number of images and prompts runs in bounded memory; `explain_batches` yields results batch by
batch for streams too large to hold. One loaded model may be shared by many threads.
"""

from __future__ import annotations

import logging
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

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
)
from .preprocess import DEFAULT_MAX_PIXELS, Placement, load_image, model_view, preprocess, to_original
from .tokenizer import load_tokenizer
from .visualize import grid, layer_figure, overlay

__all__ = ["LeGradModel", "Explanation", "ImageFailure", "load", "session_options", "DEFAULT_MEMORY_BUDGET"]

log = logging.getLogger("legrad_runtime")

DEFAULT_MEMORY_BUDGET = 2 * 1024**3  # bytes of graph intermediates per onnxruntime call
PROMPT_LOOP_KEY = "prompt_loop"  # metadata.extra flag: the image graph scans over prompts inside
DEVICES = ("auto", "cpu", "cuda")
MAX_PROMPT_CHARS = 10_000  # CLIP reads 77 tokens; longer text only costs cleaning time
ImageSource = str | Path | Image.Image | np.ndarray


@dataclass(frozen=True)
class ImageFailure:
    """An input image that could not be explained, and why (the rest of its batch still is)."""

    index: int
    source: str
    error: ImageInputError


@dataclass
class Explanation:
    """LeGrad results for B images × P prompts. Row b is the b-th image that could be read."""

    heatmaps: np.ndarray  # (B, P, H, W) float32 in [0, 1], on the model's input (image_size)
    layer_maps: np.ndarray  # (B, P, L, gh, gw) raw per-layer maps (grid_size)
    image_embeds: np.ndarray  # (B, E) L2-normalised
    text_embeds: np.ndarray  # (P, E) L2-normalised
    images: list[Image.Image]  # the originals, RGB, EXIF orientation applied
    placements: list[Placement]  # where each model input sits on its original image
    sources: list[str]  # a name for each row: file path or 'image #i'
    prompts: list[str]  # prompt texts ('embedding #p' for precomputed embeddings)
    layers: tuple[int, ...]
    logit_scale: float
    failures: list[ImageFailure]
    preprocess: PreprocessCfg  # how the images became the model's input
    logit_bias: float | None = None  # SigLIP's (sigmoid loss); None for CLIP (softmax over prompts)

    @property
    def similarities(self) -> np.ndarray:
        """Cosine similarity of each image with each prompt, (B, P)."""
        return self.image_embeds @ self.text_embeds.T

    @property
    def probabilities(self) -> np.ndarray:
        """Zero-shot probabilities (B, P), as the model was trained.

        Without a logit bias (CLIP, contrastive softmax loss): softmax over the prompts of
        logit_scale · cos; each row sums to 1. With one (SigLIP, sigmoid loss): for each
        (image, prompt) pair on its own, sigmoid(logit_scale · cos + logit_bias); rows need not
        sum to 1, and every prompt may be likely or none.
        """
        logits = self.logit_scale * self.similarities
        if self.logit_bias is None:
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)
        logits = logits + self.logit_bias
        e = np.exp(-np.abs(logits))  # in (0, 1]: never overflows, for either sign
        return np.where(logits >= 0, 1 / (1 + e), e / (1 + e))

    def heatmap_on_original(self, b: int, p: int) -> np.ndarray:
        """Heatmap of image b / prompt p mapped back onto the original image (its height, width):
        the resize undone, 0 where 'shortest' cropped, the padding of 'longest' dropped."""
        return to_original(self.heatmaps[b, p], self.placements[b])

    def overlay(self, b: int, p: int, cmap: str = "jet", alpha: float = 0.5) -> Image.Image:
        """Heatmap over the ORIGINAL image, at its own size."""
        return overlay(self.images[b], self.heatmap_on_original(b, p), cmap=cmap, alpha=alpha)

    def layer_figure(self, b: int, p: int, cmap: str = "jet") -> Image.Image:
        """One panel per explained layer (the paper's layer-importance figure), on the model input:
        the picture the model saw (centre-cropped for 'shortest', padded for 'longest'), under maps of
        that same extent."""
        seen = model_view(self.images[b], self.preprocess)
        return layer_figure(seen, self.layer_maps[b, p], self.layers, self.prompts[p], cmap=cmap)

    def grid(self, cmap: str = "jet", cell: int = 224) -> Image.Image:
        """Images × prompts overlays with the prompts as headers and cosine scores as captions."""
        maps = [
            [self.heatmap_on_original(b, p) for p in range(len(self.prompts))]
            for b in range(len(self.images))
        ]
        return grid(self.images, maps, self.prompts, scores=self.similarities, cmap=cmap, cell=cell)


def _providers(device: str) -> list[str]:
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


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


def _warn_fallback(reason: str) -> None:
    message = (
        f"device='cuda' was asked for, but {reason}; running on CPU instead, which is much slower. "
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
        "context_length": ("tokenizer.context_length",) + (meta.tokenizer.context_length,) * 2,
    }
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
    """An exported LeGrad model: image graph, text graph and tokenizer, ready for many threads."""

    def __init__(
        self,
        folder: str | Path,
        device: str = "auto",
        verify: bool = True,
        threads: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
            raise InputError(f"max_pixels must be a positive integer, not {max_pixels!r}")
        self.max_pixels = max_pixels
        files = ModelFolder(folder, verify=verify)
        self.folder = files.path
        self.metadata: ModelMetadata = files.metadata
        providers = _providers(device)
        options = session_options(threads)
        # external data named inside a graph given as bytes resolves in the folder, never in the cwd
        options.add_session_config_entry(_EXTERNAL_DATA_FOLDER, str(self.folder))
        self._image = self._session(files, IMAGE_GRAPH, options, providers)
        self._text = self._session(files, TEXT_GRAPH, options, providers)
        self.tokenizer = load_tokenizer(self.folder, self.metadata.tokenizer, read=files.read_bytes)
        files.verify_others(read=[IMAGE_GRAPH.filename, TEXT_GRAPH.filename, *self.metadata.tokenizer.files])
        self.device = "cuda" if self._image.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if device == "cuda" and self.device == "cpu":
            if providers[0] == "CUDAExecutionProvider":
                _warn_fallback("the CUDA provider failed to start (missing CUDA / cuDNN libraries?)")
            else:
                _warn_fallback(f"this onnxruntime offers only {', '.join(ort.get_available_providers())}")

    def _session(
        self, files: ModelFolder, spec: GraphSpec, options: ort.SessionOptions, providers: list[str]
    ) -> ort.InferenceSession:
        """One graph's session from the checked bytes; by path only when it has external weights
        (listed, hence checksummed; onnxruntime keeps their paths inside the folder)."""
        if f"{spec.filename}.data" in self.metadata.files:
            model: str | bytes = str(self.folder / spec.filename)
        else:
            model = files.read_bytes(spec.filename)
        try:
            session = ort.InferenceSession(model, options, providers=providers)
        except Exception as exc:  # onnxruntime's own exception types are not importable by a stable name
            raise ModelFolderError(
                f"{spec.filename} in {self.folder} is not a graph onnxruntime can load "
                f"({type(exc).__name__}: {str(exc)[:300]}); re-export the model"
            ) from None
        _check_graph(session, spec, self.metadata)
        return session

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"LeGradModel({m.model_name!r}, pretrained={m.pretrained!r}, size={format_size(m.image_size)}, "
            f"device={self.device!r})"
        )

    # ------------------------------------------------------------------ prompts

    def embed_text(self, prompts: str | Sequence[str], batch_size: int = 64) -> np.ndarray:
        """L2-normalised text embeddings (P, E) for the prompts."""
        prompts = _check_prompts(prompts)
        chunks = []
        for start in range(0, len(prompts), batch_size):
            ids = self.tokenizer(prompts[start : start + batch_size])
            chunks.append(self._text.run(None, {TEXT_GRAPH.input_names[0]: ids})[0])
        return np.concatenate(chunks).astype(np.float32)

    def _text_embeds(self, prompts, text_embeds) -> tuple[np.ndarray, list[str]]:
        if prompts is None and text_embeds is None:
            raise PromptError(
                "no prompts given; pass prompts (texts, e.g. 'a photo of a cat') or text_embeds"
            )
        if prompts is not None and text_embeds is not None:
            raise PromptError("pass either prompts (texts) or text_embeds (precomputed embeddings), not both")
        if prompts is not None:
            names = _check_prompts(prompts)
            return self.embed_text(names), names
        emb = _check_embeddings(text_embeds, self.metadata.embed_dim)
        return emb, [f"embedding #{p}" for p in range(len(emb))]

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
        normalisation temporaries. Graphs without the prompt loop (older exports) hold every
        prompt's backward at once: per (image, prompt) it is the attention gradient and a few
        token × width tensors per layer.

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
        batch_size: int | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        on_error: str = "raise",
    ) -> Iterator[Explanation]:
        """Yield one Explanation per batch of images (bounded memory for any number of images).

        on_error='raise' stops at the first unreadable image with an ImageInputError naming it;
        'skip' leaves it out and records it in the batch's `failures`.
        """
        if on_error not in ("raise", "skip"):
            raise InputError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise InputError(f"batch_size must be a positive integer, not {batch_size!r}")
        text, names = self._text_embeds(prompts, text_embeds)
        per_call, prompts_per_call = self.chunk_sizes(len(text), batch_size, memory_budget)
        batch: list[tuple[int, ImageSource]] = []
        for index, source in enumerate(images):
            batch.append((index, source))
            if len(batch) == per_call:
                yield self._explain_batch(batch, text, names, prompts_per_call, on_error)
                batch = []
        if batch:
            yield self._explain_batch(batch, text, names, prompts_per_call, on_error)

    def explain(
        self, images: ImageSource | Sequence[ImageSource], prompts=None, **kwargs: Any
    ) -> Explanation:
        """Explain every image for every prompt; see `explain_batches` for the options."""
        if isinstance(images, (str, Path, Image.Image, np.ndarray)):
            images = [images]
        if len(images) == 0:
            raise ImageInputError("no images given; pass at least one path, PIL image or uint8 array")
        parts = list(self.explain_batches(images, prompts, **kwargs))
        return _concat(parts)

    def _explain_batch(self, batch, text, names, prompts_per_call, on_error) -> Explanation:
        cfg = self.metadata.preprocess
        pixels, originals, placements, sources, failures = [], [], [], [], []
        for index, source in batch:
            is_path = isinstance(source, (str, Path))
            label = str(source) if is_path else f"image #{index}"
            try:
                image = load_image(source, name=None if is_path else label, max_pixels=self.max_pixels)
                x, placement = preprocess(image, cfg)
            except ImageInputError as exc:
                if on_error == "raise":
                    raise
                failures.append(ImageFailure(index, label, exc))
                continue
            pixels.append(x)
            originals.append(image.convert("RGB"))  # preprocess needs the native mode; pictures need RGB
            placements.append(placement)
            sources.append(label)
        m = self.metadata
        if pixels:
            x = np.stack(pixels)
            runs = [
                self._image.run(None, {"pixel_values": x, "text_embeds": text[i : i + prompts_per_call]})
                for i in range(0, len(text), prompts_per_call)
            ]
            heat = np.concatenate([r[0] for r in runs], 1)
            layer_maps = np.concatenate([r[1] for r in runs], 1)
            embeds = runs[0][2]
            if not (np.isfinite(heat).all() and np.isfinite(layer_maps).all() and np.isfinite(embeds).all()):
                raise ModelFolderError(
                    f"the image graph of {self.folder} gave NaN or infinite values for {', '.join(sources)}; "
                    "its weights are broken: re-export the model"
                )
        else:  # every image of this batch failed: zero rows, same shapes
            heat = np.zeros((0, len(names), *m.image_size), np.float32)
            layer_maps = np.zeros((0, len(names), len(m.layers), *m.grid_size), np.float32)
            embeds = np.zeros((0, m.embed_dim), np.float32)
        return Explanation(
            heatmaps=heat,
            layer_maps=layer_maps,
            image_embeds=embeds,
            text_embeds=text,
            images=originals,
            placements=placements,
            sources=sources,
            prompts=list(names),
            layers=tuple(m.layers),
            logit_scale=m.logit_scale,
            logit_bias=m.logit_bias,
            preprocess=m.preprocess,
            failures=failures,
        )


def load(
    folder: str | Path,
    device: str = "auto",
    verify: bool = True,
    threads: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> LeGradModel:
    """Load an exported model folder: metadata validated, every file inside it and (unless
    verify=False) matching its sha256, each graph's shapes agreeing with the metadata.

    `threads`: CPU cores each onnxruntime call may use (None: all physical cores).
    `max_pixels`: the most pixels an input image may decode to (larger JPEGs are decoded at
    a reduced scale, other formats refused before decoding).
    """
    return LeGradModel(folder, device=device, verify=verify, threads=threads, max_pixels=max_pixels)


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
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


def _concat(parts: list[Explanation]) -> Explanation:
    first = parts[0]
    if len(parts) == 1:
        return first
    return Explanation(
        heatmaps=np.concatenate([p.heatmaps for p in parts]),
        layer_maps=np.concatenate([p.layer_maps for p in parts]),
        image_embeds=np.concatenate([p.image_embeds for p in parts]),
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
    )
