"""How every command of this project ends: one line on stderr and a documented exit code.

    0    success
    1    partial success: some inputs were skipped (each named on stderr), the rest written
    2    bad input: arguments, model folder, images, output folder; nothing useful was written
    3    internal error: a bug or an environment failure; one line, the traceback with LEGRAD_DEBUG=1
    130  interrupted (Ctrl-C)
    141  the reader of stdout went away (`legrad info ... | head`): silent, as a shell pipe expects
    143  terminated (SIGTERM); temporary files are removed as for Ctrl-C

`run_main` installs a SIGTERM handler that unwinds like Ctrl-C, so `finally` blocks and
`except BaseException` clean-ups (the exporter's temporary folder) run on both.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Callable

from .errors import InputError, LegradError
from .files import printable
from .preprocess import DEFAULT_MAX_PIXELS

__all__ = [
    "EXIT_OK",
    "EXIT_PARTIAL",
    "EXIT_BAD_INPUT",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_TERMINATED",
    "Terminated",
    "add_max_pixels_option",
    "max_pixels_from",
    "run_main",
    "say",
]

EXIT_OK, EXIT_PARTIAL, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE, EXIT_TERMINATED = 130, 141, 143
DEBUG_ENV = "LEGRAD_DEBUG"


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives, so clean-up code runs as for Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def add_max_pixels_option(parser: argparse.ArgumentParser, beyond: str) -> None:
    """`--max-pixels MP`, the same on every command that decodes images; `beyond`: what happens above."""
    parser.add_argument(
        "--max-pixels",
        type=float,
        default=DEFAULT_MAX_PIXELS / 1e6,
        metavar="MP",
        help=f"largest image to decode, in megapixels (default: {DEFAULT_MAX_PIXELS / 1e6:g}); larger "
        f"JPEGs are decoded at 1/2 to 1/8 scale, other formats {beyond}",
    )


def max_pixels_from(args: argparse.Namespace) -> int:
    """The pixel limit `--max-pixels` asks for, checked: (0, 10000] megapixels."""
    if not 0 < args.max_pixels <= 1e4:
        raise InputError(f"--max-pixels must be in (0, 10000] megapixels, not {args.max_pixels:g}")
    return max(1, int(args.max_pixels * 1e6))


def say(prog: str, kind: str, message: object) -> None:
    """One line on stderr, `prog: kind: message`, with control characters escaped."""
    print(f"{prog}: {kind}: {printable(message)}", file=sys.stderr, flush=True)


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run a command's body and turn every way it can end into one line and an exit code."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return body()
    except LegradError as exc:
        say(prog, "error", exc)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # stdout's reader closed early: nothing to report, and nothing more to print
        with contextlib.suppress(OSError):  # Python's own flush at exit would raise again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        say(prog, "interrupted", "stopped by Ctrl-C; temporary files were removed")
        return EXIT_INTERRUPTED
    except Terminated:
        say(prog, "terminated", "stopped by SIGTERM; temporary files were removed")
        return EXIT_TERMINATED
    except Exception as exc:  # a bug: one line for users, the traceback on request
        if os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        say(
            prog,
            "internal error",
            f"{type(exc).__name__}: {exc}. This is a bug; rerun with {DEBUG_ENV}=1 for the traceback "
            "and report it",
        )
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
