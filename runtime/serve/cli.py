"""`legrad serve MODEL_DIR`: the HTTP server's command line (registered by runtime/cli.py).

Starlette and uvicorn are imported only in `run`, so `legrad` works without the `serve` extra and
`legrad serve` without it says, in one line, what to install (exit 2).
"""

from __future__ import annotations

import argparse
import socket
from typing import Any

from ..cli_runner import EXIT_OK, add_max_pixels_option, max_pixels_from
from ..errors import LegradError

__all__ = ["add_parser", "run"]

SERVE_MODULES = ("starlette", "uvicorn", "multipart", "prometheus_client")
GRACEFUL_SHUTDOWN_S = 10  # after SIGTERM: in-flight requests get this long to finish, then are cut


class ServeError(LegradError):
    """`legrad serve` cannot start: the `serve` extra is missing, or an option is out of range."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add `serve` to the `legrad` subcommands (`sub`: argparse's subparsers action)."""
    s: argparse.ArgumentParser = sub.add_parser(
        "serve", help="serve heatmaps over HTTP (POST /v1/explain), batching concurrent requests"
    )
    s.add_argument("model_dir", help="an exported model folder (legrad-export writes them)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=_int_in(1, 65535, "--port"), default=8000, help="default: 8000")
    s.add_argument(
        "--max-batch",
        type=_int_in(1, 1024, "--max-batch"),
        default=16,
        help="most images in one onnxruntime call (default: 16)",
    )
    s.add_argument(
        "--max-wait-ms",
        type=float,
        default=10.0,
        help="how long a request waits for batch-mates (default: 10)",
    )
    s.add_argument(
        "--max-queue",
        type=_int_in(1, 1_000_000, "--max-queue"),
        default=None,
        metavar="IMAGES",
        help="images that may wait; beyond, 503 with Retry-After (default: 4 x --max-batch)",
    )
    s.add_argument(
        "--max-images", type=_int_in(1, 1024, "--max-images"), default=16, help="per request (default: 16)"
    )
    s.add_argument(
        "--max-prompts", type=_int_in(1, 1024, "--max-prompts"), default=16, help="per request (default: 16)"
    )
    s.add_argument(
        "--max-prompt-chars", type=_int_in(1, 10_000, "--max-prompt-chars"), default=300, help="default: 300"
    )
    s.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MB (default: 32)")
    s.add_argument(
        "--timeout", type=float, default=30.0, help="seconds a request may take; then 504 (default: 30)"
    )
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    s.add_argument(
        "--threads", type=int, default=None, help="CPU threads per onnxruntime call (default: all cores)"
    )
    add_max_pixels_option(s, "refused with 413")
    s.set_defaults(max_pixels=16.0)
    return s


def _int_in(low: int, high: int, flag: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a whole number, not {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{flag} must be in [{low}, {high}], not {value}")
        return value

    return parse


def run(args: argparse.Namespace) -> int:
    """Load the model and serve it until SIGINT or SIGTERM (then drain the queue and stop)."""
    missing = _missing_modules()
    if missing:
        raise ServeError(
            f"legrad serve needs {', '.join(missing)}: "
            'pip install "legrad-onnx[serve]" (next to [cpu] or [gpu])'
        )
    if not 0 <= args.max_wait_ms <= 10_000:
        raise ServeError(f"--max-wait-ms must be in [0, 10000], not {args.max_wait_ms:g}")
    if not 0 < args.timeout <= 3600 or not 0 < args.max_body_mb <= 4096:
        raise ServeError("--timeout must be in (0, 3600] s and --max-body-mb in (0, 4096]")
    max_pixels = max_pixels_from(args)
    _check_listen(args.host, args.port)

    import uvicorn

    from ..session import load
    from .app import create_app
    from .limits import Limits

    limits = Limits(
        max_body_bytes=int(args.max_body_mb * 1e6),
        max_images=args.max_images,
        max_pixels=max_pixels,
        max_prompts=args.max_prompts,
        max_prompt_chars=args.max_prompt_chars,
        timeout_s=args.timeout,
        max_queue_images=args.max_queue or 4 * args.max_batch,
    )
    model = load(args.model_dir, device=args.device, threads=args.threads, max_pixels=max_pixels)
    app = create_app(model, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, limits=limits)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        lifespan="on",
    )
    uvicorn.Server(config).run()
    return EXIT_OK


def _check_listen(host: str, port: int) -> None:
    """Fail in one line, before loading the model, when host:port cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as exc:
        raise ServeError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --host or --port"
        ) from None


def _missing_modules() -> list[str]:
    import importlib.util

    return [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
