"""Will an export (or an evaluation) at this image size fit in this machine's memory?

Refused up front with the estimate, instead of a 60 GB allocation minutes in. Counted in float32:

- always: the positional embedding resampled to N = (H / patch)·(W / patch) + prefix tokens
  (N × width) and the example images (batch × 3 × H·W);
- when the graph runs (verification, evaluation): for towers whose blocks' attention is explained
  (CLIP), the autograd reference keeps every block's attention for its backward, and the analytic
  graph holds a few more per block, so about batch × heads × N² × (layers + 4) values; for MAP-head
  towers (SigLIP) only one block's attention exists at a time (batch × heads × N² × 4); plus the
  token stream (batch × N × 4·width per block).

It is an estimate, meant to catch sizes that cannot work (ViT-B-16 at 448 px needs about 1 GB,
at 896 px about 16 GB; at 100000 px, petabytes), not to plan batch sizes.
"""

from __future__ import annotations

import os

from legrad_runtime.errors import ExportError
from legrad_runtime.metadata import Size, as_size, format_size

from .towers import TowerSpec

__all__ = ["estimate_bytes", "available_bytes", "check_fits"]


def _tokens(vit: TowerSpec, size: Size) -> int:
    return vit.tokens((size[0] // vit.patch_size, size[1] // vit.patch_size))


def estimate_bytes(vit: TowerSpec, size: int | Size, batch: int, runs_graph: bool) -> int:
    size = as_size(size)
    tokens = _tokens(vit, size)
    values = tokens * vit.width + batch * 3 * size[0] * size[1]
    if runs_graph:
        values += batch * vit.heads * tokens**2 * (4 if vit.explains_head else vit.num_layers + 4)
        values += batch * tokens * 4 * vit.width * vit.num_layers
    return 4 * values


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages, else None (unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(vit: TowerSpec, model_name: str, size: int | Size, batch: int, runs_graph: bool) -> None:
    """ExportError with the estimate when `size` cannot fit in the memory available now."""
    need, have = estimate_bytes(vit, size, batch, runs_graph), available_bytes()
    if have is not None and need > have:
        size = as_size(size)
        tokens = _tokens(vit, size)
        raise ExportError(
            f"image size {format_size(size)} needs about {need / 1e9:,.1f} GB for {model_name} "
            f"({tokens:,} tokens, "
            f"batch {batch}), but this machine has {have / 1e9:.1f} GB available; use a smaller "
            "--image-size" + (" (or --no-verify, which skips running the graph)" if runs_graph else "")
        )
