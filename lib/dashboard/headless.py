"""Driving a served dashboard from code (the rehearsal, deploy/load_check.py, the tests): Debian's Chromium run
headless through Playwright, and waiting for Voila's port."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package: PyPI's Playwright browsers need a download
# In a container: no sandbox (no user namespaces), no GPU, nothing that phones home or updates itself.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def launch_options(executable: str | Path = CHROMIUM) -> dict[str, Any]:
    """Keyword arguments for Playwright's chromium.launch (sync or async API)."""
    return {"executable_path": str(executable), "headless": True, "args": CHROMIUM_ARGS}


def wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Wait until the server on 127.0.0.1:port accepts TCP connections (a GET would start a kernel); RuntimeError if
    proc exits first, TimeoutError if it does not listen within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args[0] if isinstance(proc.args, list) else proc.args} exited with {proc.returncode}"
            )
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listened on {port} within {timeout_s:.0f} s")
