"""Imported by the Voila server process only (voila.json names lib.dashboard.server.CappedKernelManager):
the visitor cap and idle-kernel culling. Kernels never import this module, so they never load jupyter_server."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from tornado import web
from traitlets import Bool, Integer, default

from lib.dashboard.settings import env_int


def server_settings(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """Kernel limits for the Voila server from HAR_* variables: kernel cap and idle culling."""
    environ = os.environ if environ is None else environ
    return {
        "max_kernels": env_int(environ, "HAR_MAX_KERNELS", 8, 1),
        "cull_idle_timeout": env_int(environ, "HAR_KERNEL_IDLE_SECONDS", 600, 0),
        "cull_interval": env_int(environ, "HAR_CULL_INTERVAL_SECONDS", 60, 1),
    }


class CappedKernelManager(AsyncMappingKernelManager):
    """AsyncMappingKernelManager that refuses to start more than max_kernels kernels at once."""

    max_kernels = Integer(config=True, help="Most kernels (visitors) at once; more get HTTP 503 (HAR_MAX_KERNELS).")
    cull_connected = Bool(True, config=True, help="Cull idle kernels even with an open tab.")

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
        """HAR_CULL_INTERVAL_SECONDS, default 60."""
        return server_settings()["cull_interval"]

    def live_kernels(self) -> int:
        """Kernels running or starting (jupyter_client registers a start as pending before its first await)."""
        return len(set(self.list_kernel_ids()) | set(getattr(self, "_pending_kernels", {})))

    async def start_kernel(self, *, kernel_id: str | None = None, path: str | None = None, **kwargs: Any) -> str:
        """Start a kernel unless the cap is reached."""
        if kernel_id is None or kernel_id not in self:
            live = self.live_kernels()
            if live >= self.max_kernels:
                self.log.warning("refusing a new kernel: %d of %d in use", live, self.max_kernels)
                # Voila's error page shows the reason phrase: it carries the whole message.
                raise web.HTTPError(
                    503,
                    reason=f"Dashboard busy: it serves {self.max_kernels} visitors at once. "
                    "Please try again in a few minutes",
                )
        return await super().start_kernel(kernel_id=kernel_id, path=path, **kwargs)
