"""EC2 deployment files: the bootstrap script run locally against moto's S3 (apt/pip/systemd skipped, Voila
launched directly), the systemd unit, and the Voila server configuration (kernel cap, culling, websocket size)."""

from __future__ import annotations

import getpass
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
from test_dashboard import CHROMIUM, CHROMIUM_ARGS, MODEL_NAME, free_port, publish_run, shared_run, stop, wait_http
from traitlets.config.loader import JSONFileConfigLoader
from traitlets.utils.importstring import import_item

from lib.dashboard.server import CappedKernelManager, server_settings
from lib.dashboard.settings import WEBSOCKET_MAX_BYTES, dashboard_params
from lib.files import MIB
from lib.params import ROOT, ParamsError

pytestmark = pytest.mark.integration  # notebooks, subprocesses, servers or a browser

BOOTSTRAP = ROOT / "deploy" / "bootstrap.sh"
UNIT = ROOT / "deploy" / "har-dashboard.service"


def test_unit_has_restart_user_network_and_hardening():
    text = UNIT.read_text()
    for line in (
        "After=network-online.target",
        "Wants=network-online.target",
        "Restart=on-failure",
        "User=@USER@",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "MemoryMax=3G",
        "EnvironmentFile=@ENV_FILE@",
        "WantedBy=multi-user.target",
    ):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    exec_start = re.search(r"^ExecStart=(.*)$", text, re.M).group(1)
    assert "voila notebooks/dashboard.ipynb" in exec_start and "--no-strip_sources" not in exec_start
    assert "jupyter" not in exec_start  # never `jupyter server` with the voila extension


def test_bootstrap_is_valid_bash():
    subprocess.run(["bash", "-n", str(BOOTSTRAP)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-S", "warning", str(BOOTSTRAP)], check=True)


def test_voila_config_file_settings():
    config = JSONFileConfigLoader("voila.json", path=str(ROOT)).load_config()
    vc = config.VoilaConfiguration
    assert vc.strip_sources is True and vc.show_tracebacks is False and vc.file_allowlist == []
    assert vc.preheat_kernel is False
    assert import_item(vc.multi_kernel_manager_class).__name__ == "CappedKernelManager"
    size = config.Voila.tornado_settings["websocket_max_message_size"]
    assert size == WEBSOCKET_MAX_BYTES and size >= 4 * 20 * MIB  # several 20 MiB phone photos per upload


def test_kernel_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HAR_MAX_KERNELS", "3")
    monkeypatch.setenv("HAR_KERNEL_IDLE_SECONDS", "120")
    km = CappedKernelManager()
    assert (km.max_kernels, km.cull_idle_timeout, km.cull_interval, km.cull_connected) == (3, 120, 60, True)
    monkeypatch.setenv("HAR_MAX_KERNELS", "lots")
    with pytest.raises(ParamsError, match="HAR_MAX_KERNELS"):
        server_settings()
    monkeypatch.delenv("HAR_MAX_KERNELS")
    assert server_settings()["max_kernels"] == 8


def test_dashboard_env_overrides_params(tmp_path: Path):
    env = {
        "HAR_REGISTRY": "s3://bucket/models",
        "HAR_TOP_K": "3",
        "HAR_MODEL_VERSION": "20250101T000000Z-abcd1234",
        "HAR_LOW_CONFIDENCE": "0.3",
    }
    p = dashboard_params(ROOT / "params" / "demo.yaml", environ=env)
    assert (p.registry, p.top_k, p.version, p.low_confidence) == (
        "s3://bucket/models",
        3,
        "20250101T000000Z-abcd1234",
        0.3,
    )
    assert p.model_name == dashboard_params(ROOT / "params" / "demo.yaml", environ={}).model_name
    with pytest.raises(ParamsError, match="HAR_TOP_K"):
        dashboard_params(ROOT / "params" / "demo.yaml", environ={"HAR_TOP_K": "0"})
    other = tmp_path / "p.yaml"
    other.write_text("dashboard:\n  top_k: 7\n")
    assert dashboard_params(ROOT / "params" / "demo.yaml", environ={"HAR_PARAMS_FILE": str(other)}).top_k == 7


def test_kernel_cap_refuses_politely():
    import asyncio

    from tornado import web

    cls = CappedKernelManager
    km = cls(max_kernels=1)

    async def scenario() -> None:
        async def fake_start(self, **kwargs):  # jupyter_client's order: pending at once, running when ready
            self._pending_kernels["k1"] = None
            await asyncio.sleep(0.05)
            self._kernels["k1"] = object()
            await asyncio.sleep(0.05)  # more start-up work after the kernel is listed: must not count twice
            self._pending_kernels.pop("k1")
            return "k1"

        base = cls.__mro__[1]
        original = base.start_kernel
        base.start_kernel = fake_start
        try:
            first = asyncio.ensure_future(km.start_kernel(path="."))
            await asyncio.sleep(0)  # the first start is still running: it already counts
            with pytest.raises(web.HTTPError) as err:
                await km.start_kernel(path=".")
            assert err.value.status_code == 503 and "serves 1 visitors at once" in err.value.reason
            await asyncio.sleep(0.07)  # listed and still pending: counts once
            assert km.live_kernels() == 1
            assert await first == "k1"
            with pytest.raises(web.HTTPError):
                await km.start_kernel(path=".")
        finally:
            base.start_kernel = original

    asyncio.run(scenario())


def test_bootstrap_pulls_from_s3_and_serves(s3_bucket: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory):
    registry = f"s3://{s3_bucket}/models"
    version = publish_run(shared_run(tmp_path_factory), registry)["version"]
    port = free_port()
    env = {
        **os.environ,
        "HAR_REGISTRY": registry,
        "HAR_MODEL_NAME": MODEL_NAME,
        "HAR_APP_DIR": str(ROOT),
        "HAR_USER": getpass.getuser(),
        "HAR_STATE_DIR": str(tmp_path / "state"),
        "HAR_ENV_FILE": str(tmp_path / "etc" / "har-dashboard.env"),
        "HAR_PORT": str(port),
        "HAR_BIND": "127.0.0.1",
        "HAR_MAX_KERNELS": "2",
        "HAR_SKIP_APT": "1",
        "HAR_SKIP_PIP": "1",
        "HAR_BOOTSTRAP_NO_SYSTEMD": "1",
    }
    # First run: every step, nothing started; the second run repeats them (idempotent) and launches Voila.
    subprocess.run(["bash", str(BOOTSTRAP), "--no-start"], env=env, check=True, timeout=120, capture_output=True)
    env_file = (tmp_path / "etc" / "har-dashboard.env").read_text()
    model_dir = Path(re.search(r"^HAR_MODEL_DIR=(.*)$", env_file, re.M).group(1))
    assert model_dir.name == version and (model_dir / "model" / "config.json").is_file()
    unit = (tmp_path / "state" / "har-dashboard.service").read_text()
    assert not re.search(r"@[A-Z_]+@", unit) and f"WorkingDirectory={ROOT}" in unit
    if shutil.which("systemd-analyze"):  # the rendered unit parses (paths, directives)
        check = subprocess.run(
            ["systemd-analyze", "verify", str(tmp_path / "state" / "har-dashboard.service")],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stderr

    log = open(tmp_path / "voila.log", "w")
    proc = subprocess.Popen(
        ["bash", str(BOOTSTRAP)],
        env={**env, "HAR_KERNEL_IDLE_SECONDS": "6", "HAR_CULL_INTERVAL_SECONDS": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        page_html = wait_http(url, proc, timeout=120).text  # visitor 1 (plain GET: its kernel idles from now on)
        assert "dashboard is unavailable" not in page_html and "from lib.dashboard.app import main" not in page_html
        assert "harUploadGuard" in page_html
        assert requests.get(url, timeout=60).status_code == 200  # visitor 2
        busy = requests.get(url, timeout=60)  # visitor 3 is over HAR_MAX_KERNELS=2: a polite 503 page, no kernel
        assert busy.status_code == 503 and "serves 2 visitors at once. Please try again" in busy.text
        wait_http(url, proc, timeout=60)  # idle kernels are culled after HAR_KERNEL_IDLE_SECONDS: room again
        if CHROMIUM.exists():  # the widgets show the model that bootstrap pulled from S3
            from playwright.sync_api import sync_playwright

            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
                pg = browser.new_page()
                pg.goto(url)
                info = pg.wait_for_selector(".har-model-info", timeout=90_000)
                assert info.get_attribute("data-version") == version
                browser.close()
    finally:
        stop(proc)
        log.close()
    text = (tmp_path / "voila.log").read_text()
    assert "model ready" in text
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text
