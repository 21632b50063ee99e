"""Load figures for the dashboard: concurrent visitors, a flood of bare page loads, a large decode, and the memory
(RSS) of the Voila server and of each visitor's kernel.

    .venv/bin/python deploy/load_check.py --registry outputs/registry --model-name har-vit-demo --visitors 1 4 8

Each round starts a fresh Voila (the `make dashboard` command line) on a free 127.0.0.1 port.
  --mode browser  N visitors in Debian's Chromium via Playwright: page shown with its widgets, then one photo each
                  classified; RSS sampled every 0.2 s during the round (peak) and once all results are in.
  --mode http     plain concurrent GETs: the server side only (kernel start + notebook run + HTML).
  --mode flood    --flood plain GETs of / spread over --flood-seconds (none opens a websocket), then one Chromium
                  visitor classifies a photo: how the GETs were answered and how long the visitor waited. A visitor
                  answered 503 reloads after 2 s, as a person would.
  --mode decode   one Chromium visitor classifies the photo, then a --large-mp megapixel RGBA PNG: the kernel's RSS
                  after the photo and its peak while the large image decodes.
The browser runs on the same machine and competes for its CPUs. The photo is --photo, else the first JPEG under
/work/shared/data/har_sample (real photos), else a generated 1600 x 1200 one. Prints Markdown tables.
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
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import requests
from PIL import Image

from lib.dashboard.headless import launch_options, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_PHOTOS = Path("/work/shared/data/har_sample")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def photo(path: str | None) -> tuple[str, bytes]:
    """(name, JPEG bytes): the given photo, a real sample photo, or a generated 1600 x 1200 one."""
    if path:
        return Path(path).name, Path(path).read_bytes()
    real = sorted(SAMPLE_PHOTOS.glob("*/*.jpg"))[:1] if SAMPLE_PHOTOS.is_dir() else []
    if real:
        return f"{real[0].parent.name}/{real[0].name}", real[0].read_bytes()
    arr = (np.random.default_rng(0).random((1200, 1600, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=85)
    return "generated.jpg", buf.getvalue()


def large_png(megapixels: float) -> bytes:
    """An RGBA PNG of about that many pixels (4:3) that still fits the upload cap: smooth gradients compress well,
    while decoding costs the full 4 bytes per pixel."""
    h = int((megapixels * 1e6 * 3 / 4) ** 0.5)
    w = int(megapixels * 1e6 / h)
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    rgba = np.empty((h, w, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = x, y, (x + y) / 2, 255
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG", compress_level=9)
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
    try:
        wait_for_port(port, proc, timeout_s=60)
    except (RuntimeError, TimeoutError):
        proc.terminate()
        raise
    return proc, f"http://127.0.0.1:{port}/"


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


def total_pss(server: psutil.Process) -> float:
    """PSS of the server and its kernels together (MiB): pages shared between them (libraries) counted once."""
    total = 0.0
    for proc in [server, *kernel_processes(server)]:
        try:
            total += mib(proc.memory_full_info().pss)
        except psutil.Error:
            pass
    return total


def memory(server: psutil.Process) -> tuple[list[float], float]:
    """(RSS of each kernel, RSS of the server) in MiB."""
    rss = []
    for k in kernel_processes(server):
        try:
            rss.append(mib(k.memory_info().rss))
        except psutil.Error:
            pass
    return rss, mib(server.memory_info().rss)


class Sampler(threading.Thread):
    """Samples the server's and its kernels' RSS every `every` seconds; keeps the peaks (MiB)."""

    def __init__(self, server: psutil.Process, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.server, self.every = server, every
        self.peak_total = self.peak_server = self.peak_kernel = 0.0
        self._done = threading.Event()

    def run(self) -> None:
        """Sample until stopped."""
        while not self._done.is_set():
            try:
                rss, server_rss = memory(self.server)
            except psutil.Error:
                break
            self.peak_server = max(self.peak_server, server_rss)
            self.peak_kernel = max([self.peak_kernel, *rss])
            self.peak_total = max(self.peak_total, server_rss + sum(rss))
            self._done.wait(self.every)

    def stop(self) -> Sampler:
        """Stop sampling and return self."""
        self._done.set()
        self.join()
        return self


async def open_page(browser, url: str, deadline: float) -> tuple[object, int]:
    """A page showing the dashboard; reloads after 2 s while the server answers 503. (page, reloads)."""
    page = await browser.new_page()
    page.set_default_timeout(300_000)
    reloads = 0
    while True:
        resp = await page.goto(url)
        if resp is not None and resp.status == 200:
            await page.wait_for_selector(".har-model-info")
            return page, reloads
        if time.perf_counter() > deadline:
            raise TimeoutError(f"still HTTP {resp.status if resp else '?'} after {reloads} reloads")
        reloads += 1
        await asyncio.sleep(2)


async def classify(page, name: str, data: bytes, mime: str = "image/jpeg") -> None:
    """Upload one file through the upload button and wait for its card."""
    before = await page.locator(".har-results .har-result, .har-results .har-error").count()
    async with page.expect_file_chooser() as chooser:
        await page.click(".har-upload")
    await (await chooser.value).set_files([{"name": name.replace("/", "_"), "mimeType": mime, "buffer": data}])
    await page.wait_for_function(
        f"document.querySelectorAll('.har-results .har-result, .har-results .har-error').length > {before}"
    )
    if await page.locator(".har-results .har-error").count():
        raise RuntimeError(await page.locator(".har-results .har-error").first.inner_text())


async def visit(browser, url: str, photo_: tuple[str, bytes]) -> tuple[float, float]:
    """Open the page, wait for the model panel, classify one photo: (seconds to page, seconds to result)."""
    start = time.perf_counter()
    page, _ = await open_page(browser, url, start + 300)
    rendered = time.perf_counter() - start
    start = time.perf_counter()
    await classify(page, *photo_)
    return rendered, time.perf_counter() - start


async def launch(pw, chromium: str):
    """Headless Debian Chromium."""
    return await pw.chromium.launch(**launch_options(chromium))


async def browser_round(url: str, n: int, photo_: tuple[str, bytes], chromium: str, server: psutil.Process) -> dict:
    """N browser visitors at once: their timings, kernel and server RSS once all results are in, and the peaks."""
    from playwright.async_api import async_playwright

    sampler = Sampler(server)
    sampler.start()
    async with async_playwright() as pw:
        browser = await launch(pw, chromium)
        timings = await asyncio.gather(*(visit(browser, url, photo_) for _ in range(n)))
        rss, server_rss = memory(server)
        pss = total_pss(server)
        await browser.close()
    sampler.stop()
    return {"timings": list(timings), "rss": rss, "server": server_rss, "pss": pss, "sampler": sampler}


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


async def flood_round(url: str, n_gets: int, seconds: float, photo_: tuple[str, bytes], chromium: str) -> dict:
    """n_gets plain GETs of / spread over `seconds` (each in its own thread, none waits for another), then one
    Chromium visitor: status counts, the visitor's reloads and seconds from its arrival to its result."""
    from playwright.async_api import async_playwright

    def get(_: int) -> str:
        """One bare page load: the status code, or the exception's name."""
        try:
            return str(requests.get(url, timeout=300).status_code)
        except requests.RequestException as exc:
            return type(exc).__name__

    pool = concurrent.futures.ThreadPoolExecutor(n_gets)
    futures = []
    start = time.perf_counter()
    for i in range(n_gets):
        await asyncio.sleep(max(0.0, start + i * seconds / n_gets - time.perf_counter()))
        futures.append(pool.submit(get, i))
    arrived = time.perf_counter()
    async with async_playwright() as pw:
        browser = await launch(pw, chromium)
        page, reloads = await open_page(browser, url, arrived + 300)
        shown = time.perf_counter() - arrived
        await classify(page, *photo_)
        result = time.perf_counter() - arrived
        health = requests.get(url + "health", timeout=10).json()
        await browser.close()
    statuses = Counter(f.result() for f in futures)
    pool.shutdown()
    return {"statuses": statuses, "reloads": reloads, "shown": shown, "result": result, "health": health}


async def decode_round(url: str, photo_: tuple[str, bytes], png: bytes, chromium: str, server: psutil.Process) -> dict:
    """One visitor: the photo, the photo with its occlusion map (batches of occluded copies through the model), then
    the large PNG; the kernel's RSS after each and its peak during the PNG."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await launch(pw, chromium)
        page, _ = await open_page(browser, url, time.perf_counter() + 300)
        await classify(page, *photo_)
        after_photo, server_rss = memory(server)
        await page.check(".har-saliency-toggle input")
        await classify(page, *photo_)
        after_occlusion, _ = memory(server)
        await page.uncheck(".har-saliency-toggle input")
        sampler = Sampler(server, every=0.05)
        sampler.start()
        await classify(page, "large.png", png, "image/png")
        sampler.stop()
        after_large, _ = memory(server)
        await browser.close()
    return {
        "after_photo": after_photo,
        "after_occlusion": after_occlusion,
        "server": server_rss,
        "peak": sampler.peak_kernel,
        "after_large": after_large,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default="outputs/registry")
    parser.add_argument("--model-name", default="har-vit-demo")
    parser.add_argument("--visitors", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--mode", choices=["browser", "http", "flood", "decode"], default="browser")
    parser.add_argument("--photo", help="the photo each visitor classifies (default: a real sample photo)")
    parser.add_argument("--flood", type=int, default=30, help="flood mode: bare GETs of / ...")
    parser.add_argument("--flood-seconds", type=float, default=10.0, help="... spread over this many seconds")
    parser.add_argument("--large-mp", type=float, default=40.0, help="decode mode: megapixels of the PNG")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--log", default=os.devnull, help="append the servers' output here")
    args = parser.parse_args(argv)

    env = {**os.environ, "HAR_REGISTRY": args.registry, "HAR_MODEL_NAME": args.model_name}
    if args.mode in ("browser", "http"):  # room for every visitor of the round; flood and decode keep the default
        env["HAR_MAX_KERNELS"] = str(max(args.visitors) + 1)
    photo_ = photo(args.photo)
    print(
        f"machine: {os.cpu_count()} CPUs, {mib(psutil.virtual_memory().total) / 1024:.1f} GiB RAM; mode {args.mode}; "
        f"photo {photo_[0]} ({len(photo_[1]) / 1024:.0f} KiB); model {args.model_name}\n"
    )
    if args.mode in ("flood", "decode"):
        proc, url = start_server(env, args.log)
        try:
            server = psutil.Process(proc.pid)
            if args.mode == "flood":
                r = asyncio.run(flood_round(url, args.flood, args.flood_seconds, photo_, args.chromium))
                print("| bare GETs of / | answered | visitor reloads | visitor page shown (s) | visitor result (s) |")
                print("|---:|---|---:|---:|---:|")
                answered = ", ".join(f"{n} x {code}" for code, n in sorted(r["statuses"].items()))
                print(
                    f"| {args.flood} in {args.flood_seconds:g} s | {answered} | {r['reloads']} | {r['shown']:.1f} "
                    f"| {r['result']:.1f} |"
                )
                print(f"\nhealth after the visitor: {r['health']}")
            else:
                png = large_png(args.large_mp)
                r = asyncio.run(decode_round(url, photo_, png, args.chromium, server))
                print(
                    "| kernel after the photo (MiB) | after its occlusion map (MiB) | peak while the large PNG decodes "
                    "(MiB) | after it (MiB) | server (MiB) |"
                )
                print("|---:|---:|---:|---:|---:|")
                print(
                    f"| {max(r['after_photo']):.0f} | {max(r['after_occlusion']):.0f} | {r['peak']:.0f} "
                    f"| {max(r['after_large']):.0f} | {r['server']:.0f} |"
                )
                print(f"\nPNG: {args.large_mp:g} MP RGBA, {len(png) / 2**20:.1f} MiB")
        finally:
            stop_server(proc)
        return 0

    print(
        "| visitors | page shown, median / max (s) | one result, median / max (s) | kernel RSS each, median / max "
        "(MiB) | server RSS (MiB) | total RSS (MiB) | peak total RSS (MiB) | total PSS (MiB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.visitors:
        proc, url = start_server(env, args.log)
        try:
            server = psutil.Process(proc.pid)
            if args.mode == "browser":
                r = asyncio.run(browser_round(url, n, photo_, args.chromium, server))
                timings, rss, server_rss, peak = r["timings"], r["rss"], r["server"], r["sampler"].peak_total
                pss = r["pss"]
            else:
                timings = http_round(url, n)
                rss, server_rss = memory(server)
                peak, pss = float("nan"), total_pss(server)
        finally:
            stop_server(proc)
        shown, first = [t[0] for t in timings], [t[1] for t in timings]
        result = f"{statistics.median(first):.2f} / {max(first):.2f}" if args.mode == "browser" else "-"
        each = f"{statistics.median(rss):.0f} / {max(rss):.0f}" if rss else "0"
        print(
            f"| {n} | {statistics.median(shown):.1f} / {max(shown):.1f} | {result} | {each} ({len(rss)} kernels) "
            f"| {server_rss:.0f} | {server_rss + sum(rss):.0f} | {peak:.0f} | {pss:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
