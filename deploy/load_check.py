"""Load figures for the dashboard: N concurrent visitors, time until each sees the page (and one result),
and the memory (RSS) of the Voila server and of each visitor's kernel.

    .venv/bin/python deploy/load_check.py --registry outputs/registry --model-name har-vit-demo --visitors 1 2 4 8

Each round starts a fresh Voila (the `make dashboard` command line) on a free 127.0.0.1 port.
  --mode browser  Debian's Chromium via Playwright: page shown with its widgets, then one photo classified
                  (the browser runs on the same machine and competes for its CPUs).
  --mode http     plain concurrent GETs: the server side only (kernel start + notebook run + HTML).
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import io
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def photo() -> bytes:
    """A 1600 x 1200 JPEG, the size of an average phone photo after resizing."""
    arr = (np.random.default_rng(0).random((1200, 1600, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def mib(n: float) -> float:
    """Bytes to MiB."""
    return n / (1024 * 1024)


def start_server(env: dict[str, str], log_path: str) -> tuple[subprocess.Popen, str]:
    """Start Voila on a free port; return the process and its URL once it listens."""
    port = free_port()
    cmd = [
        str(Path(sys.executable).with_name("voila")),
        "notebooks/dashboard.ipynb",
        "--no-browser",
        "--Voila.ip=127.0.0.1",
        f"--port={port}",
    ]
    log = open(log_path, "a")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(240):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}/"
        time.sleep(0.25)
    proc.terminate()
    raise TimeoutError("voila did not start")


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the Voila process we started."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def kernel_processes(server: psutil.Process) -> list[psutil.Process]:
    """The live ipykernel processes started by the Voila server."""
    found = []
    for child in server.children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "ipykernel_launcher" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # exited meanwhile
            pass
    return found


def memory(server: psutil.Process) -> tuple[list[float], float]:
    """(RSS of each kernel, RSS of the server) in MiB."""
    rss = []
    for k in kernel_processes(server):
        try:
            rss.append(mib(k.memory_info().rss))
        except psutil.Error:
            pass
    return rss, mib(server.memory_info().rss)


async def visit(browser, url: str, data: bytes) -> tuple[float, float]:
    """Open the page, wait for the model panel, classify one photo: (seconds to page, seconds to result)."""
    page = await browser.new_page()
    page.set_default_timeout(300_000)
    start = time.perf_counter()
    await page.goto(url)
    await page.wait_for_selector(".har-model-info")
    rendered = time.perf_counter() - start
    start = time.perf_counter()
    async with page.expect_file_chooser() as chooser:
        await page.click(".har-upload")
    await (await chooser.value).set_files([{"name": "photo.jpg", "mimeType": "image/jpeg", "buffer": data}])
    await page.wait_for_selector(".har-results .har-result")
    return rendered, time.perf_counter() - start


async def browser_round(
    url: str, n: int, data: bytes, chromium: str, server: psutil.Process
) -> tuple[list, list, float]:
    """N browser visitors at once: their timings, then kernel and server RSS while all pages are open."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        timings = await asyncio.gather(*(visit(browser, url, data) for _ in range(n)))
        rss, server_rss = memory(server)
        await browser.close()
    return list(timings), rss, server_rss


def http_round(url: str, n: int) -> list[tuple[float, float]]:
    """N concurrent GETs of the page: seconds until each full HTML arrived (no result column)."""

    def get(_: int) -> tuple[float, float]:
        """One timed GET."""
        start = time.perf_counter()
        resp = requests.get(url, timeout=600)
        resp.raise_for_status()
        return time.perf_counter() - start, float("nan")

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(get, range(n)))


def main(argv: list[str] | None = None) -> int:
    """Run the load rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default="outputs/registry")
    parser.add_argument("--model-name", default="har-vit-demo")
    parser.add_argument("--visitors", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--mode", choices=["browser", "http"], default="browser")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--log", default=os.devnull, help="append the servers' output here")
    args = parser.parse_args(argv)

    env = {
        **os.environ,
        "HAR_REGISTRY": args.registry,
        "HAR_MODEL_NAME": args.model_name,
        "HAR_MAX_KERNELS": str(max(args.visitors) + 1),
    }
    data = photo()
    print(
        f"machine: {os.cpu_count()} CPUs, {mib(psutil.virtual_memory().total) / 1024:.1f} GiB RAM; mode {args.mode}\n"
    )
    print(
        "| visitors | page shown, median / max (s) | one result, median / max (s) | kernel RSS each, median (MiB) "
        "| server RSS (MiB) | total RSS (MiB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.visitors:
        proc, url = start_server(env, args.log)
        try:
            server = psutil.Process(proc.pid)
            if args.mode == "browser":
                timings, rss, server_rss = asyncio.run(browser_round(url, n, data, args.chromium, server))
            else:
                timings = http_round(url, n)
                rss, server_rss = memory(server)
        finally:
            stop_server(proc)
        shown, first = [t[0] for t in timings], [t[1] for t in timings]
        result = f"{statistics.median(first):.2f} / {max(first):.2f}" if args.mode == "browser" else "-"
        print(
            f"| {n} | {statistics.median(shown):.1f} / {max(shown):.1f} | {result} "
            f"| {statistics.median(rss) if rss else 0:.0f} ({len(rss)} kernels) | {server_rss:.0f} "
            f"| {server_rss + sum(rss):.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
