"""Load an exported model folder and explain images × prompts with onnxruntime. No torch.

    model = load("models/ViT-B-16__laion2b_s34b_b88k__448", device="auto")
    result = model.explain(["cat.jpg", "street.png"], ["a photo of a cat", "a remote control"])
    result.heatmaps        # float32 [B, P, S, S] in [0, 1]
    result.overlay(0, 1)   # PIL image: heatmap over the original image, at its own size

Work is split into calls that fit a memory budget (images per call × prompts per call), so any
number of images and prompts runs in bounded memory; `explain_batches` yields results batch by
batch for streams too large to hold. One loaded model may be shared by many threads.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from .errors import DeviceFallbackWarning, ImageInputError, InputError, PromptError
from .metadata import IMAGE_GRAPH, TEXT_GRAPH, ModelMetadata, read_metadata, verify_files
from .preprocess import Placement, load_image, preprocess, to_original
from .tokenizer import Tokenizer
from .visualize import grid, layer_figure, overlay

__all__ = ["LeGradModel", "Explanation", "ImageFailure", "load", "session_options", "DEFAULT_MEMORY_BUDGET"]

log = logging.getLogger("legrad_runtime")

DEFAULT_MEMORY_BUDGET = 2 * 1024**3  # bytes of graph intermediates per onnxruntime call
PROMPT_LOOP_KEY = "prompt_loop"  # metadata.extra flag: the image graph scans over prompts inside
DEVICES = ("auto", "cpu", "cuda")
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

    heatmaps: np.ndarray  # (B, P, S, S) float32 in [0, 1], on the model's input square
    layer_maps: np.ndarray  # (B, P, L, g, g) raw per-layer maps
    image_embeds: np.ndarray  # (B, E) L2-normalised
    text_embeds: np.ndarray  # (P, E) L2-normalised
    images: list[Image.Image]  # the originals, RGB, EXIF orientation applied
    placements: list[Placement]  # where each model input sits on its original image
    sources: list[str]  # a name for each row: file path or 'image #i'
    prompts: list[str]  # prompt texts ('embedding #p' for precomputed embeddings)
    layers: tuple[int, ...]
    logit_scale: float
    failures: list[ImageFailure]

    @property
    def similarities(self) -> np.ndarray:
        """Cosine similarity of each image with each prompt, (B, P)."""
        return self.image_embeds @ self.text_embeds.T

    @property
    def probabilities(self) -> np.ndarray:
        """CLIP's zero-shot probabilities over the prompts, softmax(logit_scale · cos), (B, P)."""
        logits = self.logit_scale * self.similarities
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def heatmap_on_original(self, b: int, p: int) -> np.ndarray:
        """Heatmap of image b / prompt p mapped back onto the original image (H, W), crop undone."""
        return to_original(self.heatmaps[b, p], self.placements[b])

    def overlay(self, b: int, p: int, cmap: str = "jet", alpha: float = 0.5) -> Image.Image:
        """Heatmap over the ORIGINAL image, at its own size."""
        return overlay(self.images[b], self.heatmap_on_original(b, p), cmap=cmap, alpha=alpha)

    def layer_figure(self, b: int, p: int, cmap: str = "jet") -> Image.Image:
        """One panel per explained layer (the paper's layer-importance figure), on the model input."""
        square = self.images[b].resize(self.heatmaps.shape[-2:][::-1], Image.BICUBIC)
        return layer_figure(square, self.layer_maps[b, p], self.layers, self.prompts[p], cmap=cmap)

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
    log.warning(message)
    warnings.warn(message, DeviceFallbackWarning, stacklevel=3)


class LeGradModel:
    """An exported LeGrad model: image graph, text graph and tokenizer, ready for many threads."""

    def __init__(
        self, folder: str | Path, device: str = "auto", verify: bool = True, threads: int | None = None
    ):
        self.folder = Path(folder)
        self.metadata: ModelMetadata = read_metadata(self.folder)
        if verify:
            verify_files(self.folder, self.metadata)
        providers = _providers(device)
        if device == "cuda" and providers[0] != "CUDAExecutionProvider":
            _warn_fallback(f"this onnxruntime offers only {', '.join(ort.get_available_providers())}")
        options = session_options(threads)
        self._image = ort.InferenceSession(
            str(self.folder / IMAGE_GRAPH.filename), options, providers=providers
        )
        self._text = ort.InferenceSession(
            str(self.folder / TEXT_GRAPH.filename), options, providers=providers
        )
        self.device = "cuda" if self._image.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if device == "cuda" and self.device == "cpu" and providers[0] == "CUDAExecutionProvider":
            _warn_fallback("the CUDA provider failed to start (missing CUDA / cuDNN libraries?)")
        self.tokenizer = Tokenizer.from_folder(self.folder, self.metadata.tokenizer)

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"LeGradModel({m.model_name!r}, pretrained={m.pretrained!r}, size={m.image_size}, "
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
        if (prompts is None) == (text_embeds is None):
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

        Counted in float32 with every explained layer alive. Per image: the forward (attention
        and token stream), the per-layer traces the backward keeps (three token × MLP-width
        tensors and four token × width ones), and one prompt's backward per layer (the attention
        gradient, heads × N², twice for its ReLU, and the MLP's token × MLP-width gradient). Per
        (image, prompt): the heatmap outputs and their normalisation temporaries. Graphs without
        the prompt loop (older exports) hold every prompt's backward at once: per (image, prompt)
        it is the attention gradient and a few token × width tensors per layer.
        """
        m = self.metadata
        n, d, layers, s2 = m.grid_size**2 + 1, m.width, len(m.layers), m.image_size**2
        hn2 = m.heads * n * n
        if self.prompts_in_graph_loop:
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
                image = load_image(source, name=None if is_path else label)
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
        else:  # every image of this batch failed: zero rows, same shapes
            heat = np.zeros((0, len(names), m.image_size, m.image_size), np.float32)
            layer_maps = np.zeros((0, len(names), len(m.layers), m.grid_size, m.grid_size), np.float32)
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
            failures=failures,
        )


def load(
    folder: str | Path, device: str = "auto", verify: bool = True, threads: int | None = None
) -> LeGradModel:
    """Load an exported model folder (metadata and sha256 checked unless verify=False).

    `threads`: CPU cores each onnxruntime call may use (None: all physical cores).
    """
    return LeGradModel(folder, device=device, verify=verify, threads=threads)


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
        if not p.strip():
            raise PromptError(f"prompt #{i} is empty; every prompt needs some text, e.g. 'a photo of a cat'")
    return list(prompts)


def _check_embeddings(text_embeds: Any, embed_dim: int) -> np.ndarray:
    emb = np.asarray(text_embeds, dtype=np.float32)
    if emb.ndim == 1:
        emb = emb[None]
    if emb.ndim != 2 or emb.shape[1] != embed_dim:
        raise PromptError(f"text_embeds has shape {tuple(emb.shape)}; this model needs (P, {embed_dim})")
    if emb.shape[0] == 0:
        raise PromptError("text_embeds is empty; pass at least one embedding")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if not np.isfinite(emb).all() or (norms == 0).any():
        raise PromptError("text_embeds has rows that are all zero or not finite; they cannot be normalised")
    return emb / norms


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
        failures=[f for p in parts for f in p.failures],
    )
