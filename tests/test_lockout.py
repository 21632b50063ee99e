"""No lock-out: page loads that never open a websocket and idle tabs give way to new visitors at the kernel cap; the
health URL starts no kernel; the websocket message cap follows the upload cap; kernels rank first for the OOM killer.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
import requests
from tornado import web

from lib.dashboard.headless import CHROMIUM, launch_options, wait_for_port
from lib.dashboard.server import (
    KERNEL_OOM_SCORE_ADJ,
    CappedKernelManager,
    KernelRecord,
    apply_websocket_cap,
    choose_eviction,
    raise_oom_score,
)
from lib.dashboard.settings import WEBSOCKET_HEADROOM, dashboard_params, upload_limits, websocket_max_bytes
from lib.files import MIB
from lib.params import ROOT

GRACE, IDLE = 10, 60


class Clock:
    """A wall clock for CappedKernelManager that moves only when told to."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def rec(kid: str, idle_s: float, state: str = "idle", connections: int = 0, ever: bool = False) -> KernelRecord:
    return KernelRecord(kid, state, idle_s, connections, ever)


# --------------------------------------------------------------------------- the eviction choice


def test_bare_page_loads_go_first_longest_idle_first():
    records = [
        rec("tab-idle", 500, connections=1, ever=True),  # an idle tab, idle far longer
        rec("bare-young", 12),
        rec("bare-old", 41),
        rec("closed-tab", 300, ever=True),
    ]
    assert choose_eviction(records, GRACE, IDLE) == "bare-old"


def test_pages_still_rendering_or_within_the_grace_are_kept():
    records = [
        rec("rendering", 30, state="busy"),  # executing the notebook for its GET
        rec("starting", 25, state="starting"),
        rec("just-rendered", GRACE - 1),  # its websocket may still come
        rec("active-tab", 5, connections=1, ever=True),
        rec("busy-tab", 400, state="busy", connections=1, ever=True),  # classifying: never evicted
    ]
    assert choose_eviction(records, GRACE, IDLE) is None


def test_idle_tabs_give_way_after_the_idle_limit_closed_ones_first():
    open_tab, closed_tab = rec("open", 200, connections=1, ever=True), rec("closed", 70, ever=True)
    assert choose_eviction([open_tab, closed_tab], GRACE, IDLE) == "closed"
    assert choose_eviction([open_tab, rec("open-2", 90, connections=2, ever=True)], GRACE, IDLE) == "open"
    assert choose_eviction([rec("open", IDLE - 1, connections=1, ever=True)], GRACE, IDLE) is None


# --------------------------------------------------------------------------- the manager, without processes


class FakeKernel(SimpleNamespace):
    """Stands in for a kernel manager: the attributes jupyter_server adds (last_activity, execution_state)."""


def manager(cap: int, wait: int = 0) -> CappedKernelManager:
    """A CappedKernelManager whose kernels are records only: start and shutdown touch no process."""
    km = CappedKernelManager(max_kernels=cap, admission_wait=wait, connect_grace=GRACE, idle_evict=IDLE)
    km.clock = Clock()  # idle times are what the test says, however slowly the test runs
    km.shut: list[str] = []

    async def shutdown_kernel(kernel_id: str, now: bool = False, restart: bool = False) -> None:
        km.shut.append(kernel_id)
        km.remove_kernel(kernel_id)

    km.shutdown_kernel = shutdown_kernel
    return km


def add_kernel(km: CappedKernelManager, kid: str, idle_s: float, state: str = "idle") -> None:
    km._kernels[kid] = FakeKernel(
        last_activity=datetime.fromtimestamp(km.clock() - idle_s, UTC),
        execution_state=state,
        kernel_spec=SimpleNamespace(metadata={}),
        kernel_name="har-vit",
    )
    km._kernel_connections[kid] = 0


def admit(km: CappedKernelManager) -> None:
    asyncio.run(km._admit())


def test_cap_evicts_a_bare_page_load_instead_of_refusing():
    km = manager(cap=3)
    add_kernel(km, "bare-1", 40)
    add_kernel(km, "bare-2", 25)
    add_kernel(km, "visitor", 30)
    km.notify_connect("visitor")  # its page opened the websocket
    admit(km)
    assert km.shut == ["bare-1"] and km.live_kernels() == 2 and km.evicted == 1
    assert km.health()["connected"] == 1


def test_cap_refuses_when_every_kernel_is_in_use():
    km = manager(cap=2)
    add_kernel(km, "rendering", 30, state="busy")
    add_kernel(km, "visitor", 20)
    km.notify_connect("visitor")
    with pytest.raises(web.HTTPError) as err:
        admit(km)
    assert err.value.status_code == 503 and "serves 2 visitors at once" in err.value.reason
    assert km.shut == []


def test_a_kernel_listed_before_jupyter_server_stamps_it_counts_but_is_not_evicted():
    from jupyter_server.services.kernels.kernelmanager import ServerKernelManager

    km = manager(cap=1)
    km._kernels["new"] = ServerKernelManager()  # its last_activity trait is not set yet
    assert km.kernel_record("new") is None and km.live_kernels() == 1
    with pytest.raises(web.HTTPError) as err:
        admit(km)
    assert err.value.status_code == 503


def test_a_websocket_closing_restarts_the_idle_clock():
    km = manager(cap=1)
    add_kernel(km, "tab", 3 * IDLE)  # its last kernel message was long ago ...
    km.notify_connect("tab")
    km.clock.advance(IDLE / 2)
    km.notify_disconnect("tab")  # ... but the tab closed just now
    km.clock.advance(IDLE - 1)
    assert km.kernel_record("tab").idle_s == IDLE - 1
    with pytest.raises(web.HTTPError):
        admit(km)
    km.clock.advance(2)  # idle past the limit since the tab closed: it gives way
    admit(km)
    assert km.shut == ["tab"]


async def until(condition: Callable[[], bool]) -> None:
    """Let the event loop run until condition holds (each step waits on the loop, never on a duration)."""
    while not condition():
        await asyncio.sleep(0.01)


def test_the_newest_waiting_request_gets_the_freed_kernel():
    km = manager(cap=1, wait=3600)  # no deadline expires in this test: only the order of events decides
    add_kernel(km, "rendering", 0, state="busy")

    async def scenario() -> list:
        first = asyncio.ensure_future(km._admit())
        await until(lambda: km._waiting is not None)
        first_ticket = km._waiting
        second = asyncio.ensure_future(km._admit())
        await until(lambda: km._waiting not in (None, first_ticket))
        (refused,) = await asyncio.gather(first, return_exceptions=True)  # the older request gives its place up
        assert not second.done()
        km._kernels["rendering"].execution_state = "idle"
        km.clock.advance(GRACE + 1)  # rendered; no websocket came
        return [refused, await second]

    first, second = asyncio.run(scenario())
    assert isinstance(first, web.HTTPError) and first.status_code == 503  # gave its place to the newer request
    assert second is None and km.shut == ["rendering"]


def test_kernel_limits_have_defaults_and_env_overrides(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HAR_CONNECT_GRACE_SECONDS", "7")
    monkeypatch.setenv("HAR_IDLE_EVICT_SECONDS", "45")
    monkeypatch.setenv("HAR_UNCONNECTED_SECONDS", "33")
    km = CappedKernelManager()
    assert (km.connect_grace, km.idle_evict, km.unconnected_timeout) == (7, 45, 33)
    assert km.admission_wait == 20 and km.cull_idle_timeout == 600


def test_never_connected_kernels_are_culled_after_the_short_timeout():
    km = manager(cap=4)
    km.unconnected_timeout = 30
    add_kernel(km, "bare-old", 31)
    add_kernel(km, "bare-young", 20)
    add_kernel(km, "tab", 100)
    km.notify_connect("tab")
    for kid in ("bare-old", "bare-young", "tab"):
        asyncio.run(km.cull_kernel_if_idle(kid))
    assert km.shut == ["bare-old"]  # the open tab waits for HAR_KERNEL_IDLE_SECONDS (600)


def test_removing_a_kernel_closes_its_websockets(monkeypatch: pytest.MonkeyPatch):
    from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection

    closed = []
    handler = SimpleNamespace
    sessions = {
        "gone:tab-1": handler(close=lambda: closed.append("gone:tab-1")),
        "gone:tab-2": handler(close=lambda: closed.append("gone:tab-2")),
        "kept:tab-3": handler(close=lambda: closed.append("kept:tab-3")),
    }
    monkeypatch.setattr(ZMQChannelsWebsocketConnection, "_open_sessions", sessions)
    km = manager(cap=2)
    add_kernel(km, "gone", 3 * IDLE)
    add_kernel(km, "kept", 0)
    admit(km)  # at the cap: "gone" is evicted, and its pages learn it at once
    assert km.shut == ["gone"] and sorted(closed) == ["gone:tab-1", "gone:tab-2"]
    km.notify_disconnect("gone")  # what each closed websocket reports afterwards
    assert "gone" not in km._ws_events  # a removed kernel leaves nothing behind


# --------------------------------------------------------------------------- websocket cap and OOM priority


def test_websocket_cap_follows_the_upload_cap():
    p = dashboard_params(ROOT / "params" / "demo.yaml", environ={"HAR_MAX_UPLOAD_MIB": "7"})
    assert upload_limits(p) == (7 * MIB, 7 * MIB)
    assert websocket_max_bytes(p) == 7 * MIB + WEBSOCKET_HEADROOM
    app = SimpleNamespace(tornado_settings={"other": 1})
    apply_websocket_cap(app)  # reads the environment, as the server does
    default = websocket_max_bytes(dashboard_params())
    assert app.tornado_settings == {"other": 1, "websocket_max_message_size": default}
    assert default < 96 * MIB


def test_a_child_process_oom_score_is_raised():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert raise_oom_score(child.pid)
        assert int(Path(f"/proc/{child.pid}/oom_score_adj").read_text()) == KERNEL_OOM_SCORE_ADJ
        assert not raise_oom_score(2**22 + 7)  # no such process: reported, not raised
    finally:
        child.kill()
        child.wait()


def test_unit_ranks_the_server_below_its_kernels_for_the_oom_killer():
    unit = (ROOT / "deploy" / "har-dashboard.service").read_text()
    setting = dict(re.findall(r"^(OOMScoreAdjust|OOMPolicy|MemoryHigh|MemoryMax)=(\S+)$", unit, re.M))
    assert int(setting["OOMScoreAdjust"]) < 0 < KERNEL_OOM_SCORE_ADJ
    assert setting["OOMPolicy"] == "continue"  # a killed kernel leaves the unit running

    def mib(value: str) -> float:
        return float(value[:-1]) * {"M": 1, "G": 1024}[value[-1]]

    assert mib(setting["MemoryHigh"]) < mib(setting["MemoryMax"]) <= 3.5 * 1024  # room for the OS on 4 GiB


# --------------------------------------------------------------------------- a real Voila server


@pytest.fixture(scope="module")
def lockout_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Voila with a tiny published model, a cap of 2 kernels, a 2 s websocket grace, tabs evictable after 5 s idle,
    no culling of pages that never connected, and a 1 MiB upload cap."""
    from test_dashboard import MODEL_NAME, free_port, publish_run, shared_run, stop, voila_command

    tmp = tmp_path_factory.mktemp("lockout")
    publish_run(shared_run(tmp_path_factory), str(tmp / "registry"))
    port = free_port()
    env = {
        **os.environ,
        "HAR_REGISTRY": str(tmp / "registry"),
        "HAR_MODEL_NAME": MODEL_NAME,
        "HAR_REGISTRY_CACHE": str(tmp / "cache"),
        "HAR_MAX_KERNELS": "2",
        "HAR_CONNECT_GRACE_SECONDS": "2",
        "HAR_IDLE_EVICT_SECONDS": "5",
        "HAR_ADMISSION_WAIT_SECONDS": "30",
        # Culling never takes part here (however slow the page loads): only eviction makes room.
        "HAR_UNCONNECTED_SECONDS": "3600",
        "HAR_MAX_UPLOAD_MIB": "1",
        "HAR_THREADS": "1",
    }
    log = open(tmp / "voila.log", "w")
    proc = subprocess.Popen(voila_command(port), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc)
        yield {"url": f"http://127.0.0.1:{port}/", "pid": proc.pid}
    finally:
        stop(proc)
        log.close()
        print((tmp / "voila.log").read_text()[-3000:])  # shown by pytest when a test failed


def kernel_pids(server_pid: int) -> list[int]:
    """Live ipykernel processes under the Voila server."""
    pids = []
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "ipykernel_launcher" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:  # exited meanwhile
            pass
    return pids


@pytest.mark.integration
def test_health_answers_without_starting_a_kernel(lockout_server: dict):
    for _ in range(3):
        resp = requests.get(lockout_server["url"] + "health", timeout=10)
        assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("application/json")
        health = resp.json()
        assert health["status"] == "ok" and health["max_kernels"] == 2
    assert requests.head(lockout_server["url"] + "health", timeout=10).status_code == 200
    assert kernel_pids(lockout_server["pid"]) == [] and health["kernels"] == 0


@pytest.mark.integration
def test_bare_page_loads_beyond_the_cap_do_not_lock_out_a_visitor(lockout_server: dict):
    url, cap = lockout_server["url"], 2
    statuses = [requests.get(url, timeout=90).status_code for _ in range(cap + 3)]  # none opens a websocket
    assert statuses == [200] * (cap + 3)  # each one past the cap evicted an earlier bare page load
    assert len(kernel_pids(lockout_server["pid"])) <= cap
    health = requests.get(url + "health", timeout=10).json()
    assert health["evicted"] >= 3 and health["kernels"] <= cap
    from test_dashboard import photo

    if not CHROMIUM.exists():
        assert requests.get(url, timeout=90).status_code == 200
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:  # a real visitor after them: page, websocket, a classified photo
        browser = pw.chromium.launch(**launch_options())
        page = browser.new_page()
        page.set_default_timeout(90_000)
        assert page.goto(url).status == 200
        page.wait_for_selector(".har-model-info")
        with page.expect_file_chooser() as chooser:
            page.click(".har-upload")
        chooser.value.set_files([{"name": "visitor.jpg", "mimeType": "image/jpeg", "buffer": photo(3)}])
        page.wait_for_selector(".har-results .har-result")
        assert requests.get(url + "health", timeout=10).json()["connected"] == 1
        browser.close()


@pytest.mark.integration
def test_idle_tabs_give_way_to_a_new_visitor(lockout_server: dict):

    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium missing (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    url = lockout_server["url"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(**launch_options())
        tabs = [browser.new_page(), browser.new_page()]
        for tab in tabs:  # two open tabs fill the cap of 2 (bare kernels left by other tests give way)
            tab.goto(url)
            tab.wait_for_selector(".har-model-info", timeout=90_000)
        assert requests.get(url + "health", timeout=10).json()["connected"] == 2
        time.sleep(6)  # both tabs idle past HAR_IDLE_EVICT_SECONDS=5
        assert requests.get(url, timeout=90).status_code == 200  # a new visitor gets in
        health = requests.get(url + "health", timeout=10).json()
        assert health["connected"] == 1 and health["kernels"] == 2  # one tab gave its kernel up
        browser.close()


@pytest.mark.integration
def test_kernels_rank_above_the_server_for_the_oom_killer(lockout_server: dict):
    if not kernel_pids(lockout_server["pid"]):
        assert requests.get(lockout_server["url"], timeout=90).status_code == 200
    server_adj = int(Path(f"/proc/{lockout_server['pid']}/oom_score_adj").read_text())
    kernels = [int(Path(f"/proc/{pid}/oom_score_adj").read_text()) for pid in kernel_pids(lockout_server["pid"])]
    assert kernels and all(adj == KERNEL_OOM_SCORE_ADJ > server_adj for adj in kernels)


@pytest.mark.integration
def test_a_websocket_message_over_the_upload_cap_is_refused(lockout_server: dict):
    from tornado.websocket import WebSocketClosedError, websocket_connect

    html = requests.get(lockout_server["url"], timeout=90).text
    kernel_id = re.search(r'"kernelId":\s*"([0-9a-f-]{36})"', html).group(1)
    ws_url = lockout_server["url"].replace("http://", "ws://") + f"api/kernels/{kernel_id}/channels"

    async def send(size: int) -> int | str | None:
        conn = await websocket_connect(ws_url)
        try:
            await conn.write_message(b"\0" * size, binary=True)
        except WebSocketClosedError:  # the server read the frame's length and closed before the bytes were sent
            return "closed while sending"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # read until the server closes (or answers nothing while open)
            try:
                msg = await asyncio.wait_for(conn.read_message(), 1)
            except TimeoutError:
                break
            if msg is None:
                return conn.close_code
        conn.close()
        return None

    cap = 1 * MIB + WEBSOCKET_HEADROOM  # HAR_MAX_UPLOAD_MIB=1 in this server
    # 1009 "message too big", or closed before the client finished writing: refused, not buffered either way
    assert asyncio.run(send(cap + 64 * 1024)) in (1009, "closed while sending")


def shut_down_kernel(url: str, kernel_id: str) -> None:
    """Shut a kernel down through the server's REST API, as an eviction or a cull would (double-submit XSRF)."""
    token = uuid.uuid4().hex
    resp = requests.delete(
        f"{url}api/kernels/{kernel_id}", headers={"X-XSRFToken": token}, cookies={"_xsrf": token}, timeout=30
    )
    assert resp.status_code == 204, resp.status_code


def raw_repr_shown(page: Any) -> bool:
    """True while the widget's plain-text form (a Python repr) is visible anywhere on the page."""
    return "VBox(children=" in page.evaluate("document.body.innerText")


@pytest.mark.integration
@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium missing (apt-get install -y chromium)")
def test_a_page_whose_kernel_is_gone_says_so_and_tries_again(lockout_server: dict):
    from playwright.sync_api import sync_playwright

    url, gone = lockout_server["url"], []

    def kernel_gone_once(route: Any) -> None:
        """The first page's kernel is shut down between the page's render and its first call to the kernel."""
        kernel_id = route.request.url.split("/api/kernels/")[1].split("?")[0].split("/")[0]
        if not gone:
            gone.append(kernel_id)
            shut_down_kernel(url, kernel_id)
        route.continue_()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(**launch_options())
        page = browser.new_page()
        page.set_default_timeout(90_000)
        page.route("**/api/kernels/*", kernel_gone_once)
        page.goto(url)
        notice = page.wait_for_selector('.har-connection[data-state="retry"]')
        assert "could not connect" in notice.inner_text() and not raw_repr_shown(page)
        info = page.wait_for_selector(".har-model-info")  # the page loaded itself again, with a new kernel
        assert info.is_visible() and not raw_repr_shown(page) and len(gone) == 1
        browser.close()


@pytest.mark.integration
@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium missing (apt-get install -y chromium)")
def test_a_page_that_never_reaches_a_kernel_stops_trying_and_says_so(lockout_server: dict):
    from playwright.sync_api import sync_playwright

    loads = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(**launch_options())
        page = browser.new_page()
        page.set_default_timeout(90_000)
        page.on("load", lambda _: loads.append(1))
        # Every kernel is out of reach: the server's answer for a kernel that does not exist.
        page.route("**/api/kernels/*", lambda route: route.fulfill(status=404, body='{"message": "no kernel"}'))
        page.goto(lockout_server["url"])
        notice = page.wait_for_selector('.har-connection[data-state="failed"]')
        assert "reload the page" in notice.inner_text() and notice.query_selector("button.har-reload")
        assert not raw_repr_shown(page) and not page.query_selector(".har-model-info")
        assert len(loads) == 3  # the first load and two more, then it stops
        browser.close()


@pytest.mark.integration
@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium missing (apt-get install -y chromium)")
def test_a_tab_whose_kernel_is_shut_down_says_so(lockout_server: dict):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(**launch_options())
        page = browser.new_page()
        page.set_default_timeout(90_000)
        page.goto(lockout_server["url"])
        page.wait_for_selector(".har-model-info")
        assert not page.query_selector(".har-connection")
        # As an eviction or a cull does it: the page must not go on showing a dashboard that no longer answers.
        shut_down_kernel(lockout_server["url"], page.evaluate("window.jupyterapp.widgetManager.kernel.id"))
        notice = page.wait_for_selector('.har-connection[data-state="lost"]')
        assert "Reload the page" in notice.inner_text() and notice.query_selector("button.har-reload")
        browser.close()
