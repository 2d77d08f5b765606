"""`legrad serve`'s command line without the server stack: it runs in the lean venv too."""

from __future__ import annotations

import socket
import subprocess
import sys

from legrad_runtime.cli import main


def test_importing_the_runtime_and_its_cli_never_imports_the_server_stack():
    code = (
        "import sys, legrad_runtime, legrad_runtime.cli; "
        "stack = ('starlette', 'uvicorn', 'prometheus_client', 'multipart'); "
        "print(sorted(m for m in stack if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_serve_without_the_extra_says_what_to_install_in_one_line(monkeypatch, capsys, model_folder):
    from legrad_runtime.serve import cli as serve_cli

    monkeypatch.setattr(serve_cli, "_missing_modules", lambda: ["starlette"])
    assert main(["serve", str(model_folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install "legrad-onnx[serve]"' in err[0]


def test_serve_on_a_port_in_use_says_so_in_one_line(monkeypatch, capsys, model_folder):
    from legrad_runtime.serve import cli as serve_cli

    monkeypatch.setattr(serve_cli, "_missing_modules", lambda: [])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(model_folder), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"127.0.0.1:{port}" in err[0] and "--port" in err[0]


def test_serve_options_out_of_range_are_usage_errors(capsys, model_folder):
    for argv in (["--port", "0"], ["--max-batch", "0"], ["--max-prompts", "x"]):
        try:
            main(["serve", str(model_folder), *argv])
        except SystemExit as exc:
            assert exc.code == 2
        else:
            raise AssertionError(f"{argv} was accepted")
        assert argv[0] in capsys.readouterr().err
