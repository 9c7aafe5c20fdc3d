"""`pagellm serve` as a real process: it serves, and on SIGTERM or Ctrl-C (SIGINT) it stops
accepting, lets the running stream finish, and exits 0."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from pagellm.cli import main as cli_main

API_KEY = "k"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(url: str, process: subprocess.Popen, log_path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited early:\n{log_path.read_text()}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server not up after {timeout} s:\n{log_path.read_text()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_drains_on_signal_and_exits_0(tiny_llama, tmp_path, sig):
    port, log_path = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "pagellm.cli", "serve", str(tiny_llama), "--dtype", "float32",
               "--max-model-len", "256", "--num-kv-blocks", "32", "--port", str(port), "--served-model-name",
               "tiny", "--api-key", API_KEY, "--grace-period", "60", "--log-level", "warning"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_health(url, process, log_path)
        body = {"model": "tiny", "prompt": "Hello world", "max_tokens": 30, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as response:
            lines = (line for line in response.iter_lines() if line)
            next(lines)
            process.send_signal(sig)
            rest = list(lines)
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: "):])["usage"]["completion_tokens"] == 30
        assert process.wait(timeout=60) == 0, log_path.read_text()
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_rejects_bad_arguments_before_loading(capsys):
    assert cli_main(["serve", "no-such-model", "--max-waiting", "-1"]) == 2
    assert "--max-waiting" in capsys.readouterr().err
