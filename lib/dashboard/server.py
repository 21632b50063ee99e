"""Imported by the Voila server process only (voila.json names CappedKernelManager and DashboardIdentityProvider):
the visitor cap with eviction of unused kernels, idle-kernel culling, the health URL, the websocket message cap and
the kernels' out-of-memory priority. Kernels never import this module, so they never load jupyter_server."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, NamedTuple

from jupyter_core.utils import ensure_async
from jupyter_server.auth.identity import PasswordIdentityProvider
from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from tornado import web
from traitlets import Bool, Integer, TraitError, default

from lib.dashboard.settings import dashboard_params, env_int, websocket_max_bytes

HEALTH_PATH = "/health"
# Kernels are the expendable processes: the OOM killer (of the service's cgroup or of the host) takes the largest
# of them first, never the Voila server, whose unit sets a negative OOMScoreAdjust. 800 ranks a kernel above every
# ordinary process (0) without claiming the 1000 that means "kill this first, whatever its size".
KERNEL_OOM_SCORE_ADJ = 800
ADMISSION_POLL_S = 0.25


def server_settings(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """Kernel limits for the Voila server from HAR_* variables (seconds unless named otherwise)."""
    environ = os.environ if environ is None else environ
    return {
        "max_kernels": env_int(environ, "HAR_MAX_KERNELS", 8, 1),
        "cull_idle_timeout": env_int(environ, "HAR_KERNEL_IDLE_SECONDS", 600, 0),
        "cull_interval": env_int(environ, "HAR_CULL_INTERVAL_SECONDS", 10, 1),
        "connect_grace": env_int(environ, "HAR_CONNECT_GRACE_SECONDS", 15, 1),
        "unconnected_timeout": env_int(environ, "HAR_UNCONNECTED_SECONDS", 120, 1),
        "idle_evict": env_int(environ, "HAR_IDLE_EVICT_SECONDS", 45, 1),
        "admission_wait": env_int(environ, "HAR_ADMISSION_WAIT_SECONDS", 20, 0),
    }


class KernelRecord(NamedTuple):
    """What the eviction choice needs to know about one running kernel."""

    kernel_id: str
    state: str  # jupyter_server's execution_state: starting, busy, idle (or dead)
    idle_s: float  # seconds since its last activity: a kernel message, or a websocket opening or closing
    connections: int  # websockets open now
    ever_connected: bool  # a page ever opened a websocket to it


def choose_eviction(records: Iterable[KernelRecord], connect_grace: float, idle_evict: float) -> str | None:
    """The kernel to shut down so that a new visitor gets one, or None when every kernel is in real use.

    First a bare page load: a kernel whose page was rendered more than connect_grace seconds ago and never opened
    its websocket (a plain GET, a health probe on /, a crawler), the longest idle first. Then a kernel idle for more
    than idle_evict seconds even with a tab open, tabs already closed first, then the longest idle. Kernels still
    starting or rendering, busy ones and recently used ones are never chosen.
    """
    records = [r for r in records if r.state not in ("starting", "busy")]
    bare = [r for r in records if not r.ever_connected and r.idle_s > connect_grace]
    if bare:
        return max(bare, key=lambda r: r.idle_s).kernel_id
    idle = [r for r in records if r.idle_s > idle_evict]
    if idle:
        return min(idle, key=lambda r: (r.connections > 0, -r.idle_s)).kernel_id
    return None


def raise_oom_score(pid: int, value: int = KERNEL_OOM_SCORE_ADJ) -> bool:
    """Raise a process's oom_score_adj to value (an unprivileged owner may raise it, never lower it); True if set."""
    path = f"/proc/{pid}/oom_score_adj"
    try:
        with open(path) as f:
            if int(f.read()) >= value:
                return True
        with open(path, "w") as f:
            f.write(str(value))
    except (OSError, ValueError):
        return False
    return True


class CappedKernelManager(AsyncMappingKernelManager):
    """AsyncMappingKernelManager with a kernel cap that evicts unused kernels before it refuses anyone.

    Every GET of the page starts a kernel, so page loads that never open a websocket, and tabs left open, would
    otherwise hold the cap until culled. At the cap a new page load shuts down the kernel choose_eviction names; when
    every kernel is in real use the newest request waits up to admission_wait seconds for one to become free (an
    older waiting request gets the 503 at once: under a flood the newest request is the one most likely to still
    have someone waiting for it), then gets HTTP 503 with a message.
    """

    max_kernels = Integer(config=True, help="Most kernels (visitors) at once (HAR_MAX_KERNELS).")
    cull_connected = Bool(True, config=True, help="Cull idle kernels even with an open tab.")
    connect_grace = Integer(
        config=True,
        help="Seconds a rendered page has to open its websocket before its kernel counts as a bare page load "
        "(HAR_CONNECT_GRACE_SECONDS).",
    )
    unconnected_timeout = Integer(
        config=True,
        help="A kernel whose page never opened its websocket is culled after this many idle seconds "
        "(HAR_UNCONNECTED_SECONDS).",
    )
    idle_evict = Integer(
        config=True,
        help="At the cap, a kernel idle this many seconds may be shut down for a new visitor, even with its tab open "
        "(HAR_IDLE_EVICT_SECONDS).",
    )
    admission_wait = Integer(
        config=True, help="Seconds the newest request waits for a free kernel at the cap (HAR_ADMISSION_WAIT_SECONDS)."
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Wall-clock seconds, as jupyter_server's last_activity stamps: a test replaces it to age kernels at will.
        self.clock: Callable[[], float] = time.time
        self._ws_events: dict[str, float] = {}  # kernel id -> clock() of its last websocket open or close
        self._ever_connected: set[str] = set()
        self._admission = asyncio.Lock()
        self._waiting: object | None = None  # the one request waiting for room (the newest)
        self.evicted = 0
        # voila.json can name classes but not compute values: this object, built by Voila before its tornado
        # application takes Voila.tornado_settings, sets the websocket message cap from the upload cap.
        apply_websocket_cap(self.parent)

    @default("max_kernels")
    def _default_max_kernels(self) -> int:
        """HAR_MAX_KERNELS, default 8."""
        return server_settings()["max_kernels"]

    @default("cull_idle_timeout")
    def _default_cull_idle_timeout(self) -> int:
        """HAR_KERNEL_IDLE_SECONDS, default 600."""
        return server_settings()["cull_idle_timeout"]

    @default("cull_interval")
    def _default_cull_interval(self) -> int:
        """HAR_CULL_INTERVAL_SECONDS, default 10."""
        return server_settings()["cull_interval"]

    @default("connect_grace")
    def _default_connect_grace(self) -> int:
        """HAR_CONNECT_GRACE_SECONDS, default 15."""
        return server_settings()["connect_grace"]

    @default("unconnected_timeout")
    def _default_unconnected_timeout(self) -> int:
        """HAR_UNCONNECTED_SECONDS, default 120: eight pages loading at once in one browser on a busy 2-core host
        took over 30 s from their HTML to their websockets, and eviction at the cap does not need this to be short."""
        return server_settings()["unconnected_timeout"]

    @default("idle_evict")
    def _default_idle_evict(self) -> int:
        """HAR_IDLE_EVICT_SECONDS, default 45: with the page render on top, a visitor waits at most about a minute."""
        return server_settings()["idle_evict"]

    @default("admission_wait")
    def _default_admission_wait(self) -> int:
        """HAR_ADMISSION_WAIT_SECONDS, default 20."""
        return server_settings()["admission_wait"]

    # ---------------------------------------------------------------- bookkeeping

    def live_kernels(self) -> int:
        """Kernels running, starting or stopping (jupyter_client lists a start or a shutdown as pending before its
        first await)."""
        return len(set(self.list_kernel_ids()) | set(getattr(self, "_pending_kernels", {})))

    def notify_connect(self, kernel_id: str) -> None:
        """A page opened its websocket: the kernel serves a real visitor."""
        super().notify_connect(kernel_id)
        self._ever_connected.add(kernel_id)
        self._ws_events[kernel_id] = self.clock()

    def notify_disconnect(self, kernel_id: str) -> None:
        """A websocket closed; the idle clock restarts from here (unless the kernel is gone: nothing to keep)."""
        super().notify_disconnect(kernel_id)
        if kernel_id in self._kernels:
            self._ws_events[kernel_id] = self.clock()

    def remove_kernel(self, kernel_id: str) -> Any:
        """Forget a removed kernel's websocket history too, and close the websockets still open to it."""
        self._ws_events.pop(kernel_id, None)
        self._ever_connected.discard(kernel_id)
        removed = super().remove_kernel(kernel_id)
        close_websockets(kernel_id)
        return removed

    def kernel_record(self, kernel_id: str, now: float | None = None) -> KernelRecord | None:
        """The kernel's record for choose_eviction; None while it starts or stops."""
        kernel = self._kernels.get(kernel_id)
        if kernel is None or kernel_id in getattr(self, "_pending_kernels", {}):
            return None
        try:
            last = kernel.last_activity
        except (AttributeError, TraitError):  # listed, but jupyter_server has not stamped it yet: still starting
            return None
        now = self.clock() if now is None else now
        last_s = max(last.timestamp() if isinstance(last, datetime) else now, self._ws_events.get(kernel_id, 0.0))
        return KernelRecord(
            kernel_id,
            str(getattr(kernel, "execution_state", "starting")),
            max(0.0, now - last_s),
            int(self._kernel_connections.get(kernel_id, 0)),
            kernel_id in self._ever_connected,
        )

    def kernel_records(self) -> list[KernelRecord]:
        """Records of every running kernel."""
        now = self.clock()
        return [r for kid in list(self._kernels) if (r := self.kernel_record(kid, now)) is not None]

    def health(self) -> dict[str, Any]:
        """The health URL's answer: kernels in use and the cap (reads state only, starts nothing)."""
        records = self.kernel_records()
        return {
            "status": "ok",
            "kernels": self.live_kernels(),
            "max_kernels": self.max_kernels,
            "connected": sum(r.connections > 0 for r in records),
            "evicted": self.evicted,
        }

    # ---------------------------------------------------------------- admission

    async def _make_room(self) -> bool:
        """True once a kernel may start; evicts at most one kernel per pass."""
        async with self._admission:  # one eviction at a time: two requests never count the same freed place
            if self.live_kernels() < self.max_kernels:
                return True
            victim = choose_eviction(self.kernel_records(), self.connect_grace, self.idle_evict)
            if victim is None:
                return False
            record = self.kernel_record(victim)
            self.log.warning("evicting kernel %s for a new visitor: %s", victim, record)
            self.evicted += 1
            try:
                await ensure_async(self.shutdown_kernel(victim, now=True))
            except Exception:  # gone meanwhile (its tab's shutdown beacon): the place is free all the same
                self.log.exception("evicting kernel %s failed", victim)
            return self.live_kernels() < self.max_kernels

    async def _admit(self) -> None:
        """Return when a new kernel may start; HTTP 503 when none becomes free in time."""
        if await self._make_room():
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.admission_wait
        me = object()
        self._waiting = me  # an older waiting request sees this and gives up
        try:
            while self._waiting is me and loop.time() < deadline:
                await asyncio.sleep(ADMISSION_POLL_S)
                if self._waiting is me and await self._make_room():
                    return
        finally:
            if self._waiting is me:
                self._waiting = None
        live = self.live_kernels()
        self.log.warning("refusing a new kernel: %d of %d in use, none idle", live, self.max_kernels)
        # Voila's error page shows the reason phrase: it carries the whole message.
        raise web.HTTPError(
            503,
            reason=f"Dashboard busy: it serves {self.max_kernels} visitors at once and all of them are active. "
            "Please try again in a minute",
        )

    async def start_kernel(self, *, kernel_id: str | None = None, path: str | None = None, **kwargs: Any) -> str:
        """Start a kernel once there is room (see the class docstring); raise its out-of-memory priority."""
        if kernel_id is None or kernel_id not in self:
            await self._admit()
        kernel_id = await super().start_kernel(kernel_id=kernel_id, path=path, **kwargs)
        pid = getattr(getattr(self._kernels.get(kernel_id), "provisioner", None), "pid", None)
        if pid and not raise_oom_score(pid):
            self.log.warning("could not raise the oom_score_adj of kernel %s (pid %s)", kernel_id, pid)
        return kernel_id

    # ---------------------------------------------------------------- culling

    async def cull_kernel_if_idle(self, kernel_id: str) -> None:
        """Cull as jupyter_server does, and also a kernel whose page never opened its websocket after
        unconnected_timeout idle seconds."""
        record = self.kernel_record(kernel_id)
        if (
            record is not None
            and not record.ever_connected
            and record.state not in ("starting", "busy")
            and record.idle_s > self.unconnected_timeout
        ):
            self.log.info("culling kernel %s: its page never connected (%.0f s idle)", kernel_id, record.idle_s)
            await ensure_async(self.shutdown_kernel(kernel_id, now=True))
            return
        await super().cull_kernel_if_idle(kernel_id)


def close_websockets(kernel_id: str) -> int:
    """Close every open websocket to kernel_id; return how many.

    jupyter_server leaves a page's websocket open when its kernel is shut down (evicted, culled, or through the API):
    the page would go on showing a dashboard that no longer answers. Closed, the page's kernel connection retries,
    finds no kernel and gives up, and the page says so (static/dashboard.js)."""
    sessions = getattr(ZMQChannelsWebsocketConnection, "_open_sessions", {})
    handlers = [h for key, h in list(sessions.items()) if key.split(":", 1)[0] == kernel_id]
    for handler in handlers:
        handler.close()
    return len(handlers)


def apply_websocket_cap(app: Any) -> None:
    """Set the Voila app's tornado websocket_max_message_size from the dashboard's upload cap: an upload message
    over it closes the websocket instead of being buffered by the server."""
    settings = getattr(app, "tornado_settings", None)
    if not isinstance(settings, dict):
        return
    app.tornado_settings = {**settings, "websocket_max_message_size": websocket_max_bytes(dashboard_params())}


class HealthHandler(web.RequestHandler):
    """GET /health: 200 and a small JSON (kernels in use, the cap) without starting a kernel; no login, no cookie,
    so a load balancer or the proxy can probe it."""

    def get(self) -> None:
        """Answer with the kernel manager's health()."""
        km = self.settings["kernel_manager"]
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(km.health()))

    def head(self) -> None:
        """Same status and headers, no body."""
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish()


class DashboardIdentityProvider(PasswordIdentityProvider):
    """Voila's default identity provider, plus the health URL.

    Standalone Voila loads no server extensions, and its last route sends every other path to the notebook. The
    identity provider's handlers are the one configurable list it registers ahead of that route.
    """

    def get_handlers(self) -> list[tuple[str, object]]:
        """The login handlers, and HEALTH_PATH."""
        return [(HEALTH_PATH, HealthHandler), *super().get_handlers()]
