"""`legrad serve`: LeGrad heatmaps over HTTP (Starlette on uvicorn), with dynamic batching.

Needs the `serve` extra (`pip install "legrad-onnx[serve]"`). Importing `legrad_runtime` never
imports this package; `legrad_runtime.serve.cli` is the only part the `legrad` command loads, and it
imports Starlette only when the server starts.
"""

from __future__ import annotations

__all__: list[str] = []
