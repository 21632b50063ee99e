"""EC2 deployment files: the bootstrap script run locally against moto's S3 (apt/pip/systemd skipped, Voila
launched directly), the systemd unit, and the Voila server configuration (kernel cap, culling, websocket size)."""

from __future__ import annotations

import getpass
import grp
import json
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
from test_dashboard import (
    MODEL_NAME,
    free_port,
    photo,
    publish_run,
    shared_run,
    stop,
    wait_http,
)
from test_serving_install import serving_app
from traitlets.config.loader import JSONFileConfigLoader
from traitlets.utils.importstring import import_item

from lib.dashboard.headless import CHROMIUM, launch_options, wait_for_port
from lib.dashboard.server import CappedKernelManager, apply_websocket_cap, server_settings
from lib.dashboard.settings import dashboard_params, websocket_max_bytes
from lib.files import MIB
from lib.params import ROOT, ParamsError

BOOTSTRAP = ROOT / "deploy" / "bootstrap.sh"
UNIT = ROOT / "deploy" / "har-dashboard.service"
RENDER = ROOT / "deploy" / "nginx" / "render.sh"
USER_DATA = ROOT / "deploy" / "user-data.sh"
# The longest a page load (kernel start and notebook run) may take on a busy 2-core machine: timeouts that must
# outlast page loads are built from it, so that a slow machine cannot make them expire early.
PAGE_LOAD_S = 20


def base_env() -> dict[str, str]:
    """This process's environment without any HAR_* variable: a run of the bootstrap that is given nothing."""
    return {k: v for k, v in os.environ.items() if not k.startswith("HAR_")}


def run_bootstrap(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """deploy/bootstrap.sh with exactly this environment; its output as text."""
    return subprocess.run(["bash", str(BOOTSTRAP), *args], env=env, capture_output=True, text=True, timeout=900)


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


@pytest.mark.parametrize("script", [BOOTSTRAP, RENDER, USER_DATA], ids=lambda p: p.name)
def test_scripts_are_valid_bash(script: Path):
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(script)], check=True)  # every severity: the scripts stay clean


def test_user_data_runs_as_cloud_init_needs():
    text = USER_DATA.read_text()
    assert text.startswith("#!/bin/bash\n")  # cloud-init runs user data as a script only with a shebang
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    install = next(i for i, line in enumerate(lines) if re.search(r"apt-get install .*\bgit\b", line))
    clone = next(i for i, line in enumerate(lines) if "git clone" in line)
    bootstrap = next(i for i, line in enumerate(lines) if "deploy/bootstrap.sh" in line and "bash" in line)
    assert install < clone < bootstrap  # Debian 12 images have no git before the bootstrap installs it
    assert "set -euo pipefail" in lines
    assert text in (ROOT / "docs" / "deploy.md").read_text()  # the deploy guide shows the user data whole


def test_voila_config_file_settings():
    config = JSONFileConfigLoader("voila.json", path=str(ROOT)).load_config()
    vc = config.VoilaConfiguration
    assert vc.strip_sources is True and vc.show_tracebacks is False and vc.file_allowlist == []
    assert vc.preheat_kernel is False
    assert import_item(vc.multi_kernel_manager_class).__name__ == "CappedKernelManager"
    assert import_item(config.Voila.identity_provider_class).__name__ == "DashboardIdentityProvider"  # /health
    # The websocket cap follows HAR_MAX_UPLOAD_MIB (CappedKernelManager sets it): voila.json must not fix another.
    assert "websocket_max_message_size" not in config.Voila.get("tornado_settings", {})
    app = type("App", (), {"tornado_settings": {}})()
    apply_websocket_cap(app)
    size = app.tornado_settings["websocket_max_message_size"]
    assert size == websocket_max_bytes(dashboard_params()) and 20 * MIB < size < 24 * MIB  # one phone photo


def test_kernel_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HAR_MAX_KERNELS", "3")
    monkeypatch.setenv("HAR_KERNEL_IDLE_SECONDS", "120")
    km = CappedKernelManager()
    assert (km.max_kernels, km.cull_idle_timeout, km.cull_interval, km.cull_connected) == (3, 120, 10, True)
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
    km = cls(max_kernels=1, admission_wait=0)  # nothing here can be evicted (tests/test_lockout.py): refuse at once

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


@pytest.mark.integration
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
        "HAR_PROXY": "none",  # the root test below covers nginx
        "HAR_NGINX_DIR": str(tmp_path / "nginx"),  # where a site would be: never this host's own
    }
    # First run: every step, nothing started; the second run repeats them (idempotent) and launches Voila.
    first = run_bootstrap(env, "--no-start")
    assert first.returncode == 0, first.stderr
    env_file = (tmp_path / "etc" / "har-dashboard.env").read_text()
    model_dir = Path(re.search(r"^HAR_MODEL_DIR=(.*)$", env_file, re.M).group(1)).resolve()  # a link
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
        # Given only where the env file is, the switches of this run and three new settings: every other setting
        # (registry, paths, port, HAR_MAX_KERNELS=2) comes from the first run. Culling waits longer than three page
        # loads take, so visitor 3 can only get in by an eviction.
        env={
            **base_env(),
            "HAR_ENV_FILE": env["HAR_ENV_FILE"],
            "HAR_SKIP_APT": "1",
            "HAR_SKIP_PIP": "1",
            "HAR_BOOTSTRAP_NO_SYSTEMD": "1",
            "HAR_CONNECT_GRACE_SECONDS": "2",
            "HAR_UNCONNECTED_SECONDS": str(3 * PAGE_LOAD_S),
            "HAR_CULL_INTERVAL_SECONDS": "1",
        },
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        page_html = wait_http(url, proc, timeout=120).text  # visitor 1 (plain GET: its kernel idles from now on)
        assert "dashboard is unavailable" not in page_html and "from lib.dashboard.app import main" not in page_html
        assert "harUploadGuard" in page_html
        assert requests.get(url, timeout=60).status_code == 200  # visitor 2
        # Visitor 3 is over HAR_MAX_KERNELS=2, but neither page opened a websocket: the longest idle one gives way.
        assert requests.get(url, timeout=60).status_code == 200
        health = requests.get(url + "health", timeout=10).json()
        assert health["max_kernels"] == 2  # kept from the first run
        assert health["kernels"] <= 2 and health["evicted"] == 1
        # Kernels whose page never connected are culled after HAR_UNCONNECTED_SECONDS.
        deadline = time.monotonic() + 3 * PAGE_LOAD_S + 60
        while requests.get(url + "health", timeout=10).json()["kernels"] and time.monotonic() < deadline:
            time.sleep(1)
        assert requests.get(url + "health", timeout=10).json()["kernels"] == 0
        if CHROMIUM.exists():  # the widgets show the model that bootstrap pulled from S3
            from playwright.sync_api import sync_playwright

            with sync_playwright() as pw:
                browser = pw.chromium.launch(**launch_options())
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


# --------------------------------------------------------------------------- the bootstrap for real, as root

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("nginx") or not Path("/etc/nginx/nginx.conf").is_file(),
    reason="runs as root with Debian's nginx (apt-get install -y nginx)",
)
AUTH = ("visitor", "a long test password")


def debian_nginx_copy(prefix: Path) -> Path:
    """/etc/nginx copied into prefix, its absolute paths (config, logs, pid) moved there too: Debian's real main
    configuration, so `nginx -t` sees the site as the host will. Temp files go to prefix as well."""
    target = prefix / "nginx"
    shutil.copytree("/etc/nginx", target, symlinks=True)
    conf = target / "nginx.conf"
    text = conf.read_text().replace("/etc/nginx/", f"{target}/")
    text = text.replace("/var/log/nginx/", f"{prefix}/log/").replace("/run/nginx.pid", f"{prefix}/nginx.pid")
    temp = "".join(f"\n\t{kind}_temp_path {prefix}/tmp/{kind};" for kind in ("client_body", "proxy", "fastcgi"))
    conf.write_text(re.sub(r"^http \{", lambda m: m.group(0) + temp, text, count=1, flags=re.M))
    (prefix / "log").mkdir()
    (prefix / "tmp").mkdir()
    return target


def unit_process(unit_file: Path) -> dict:
    """How systemd would start the unit: argv (with ${VAR} expanded), environment, user, group, directory, umask."""
    directives: dict[str, list[str]] = {}
    for line in unit_file.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            directives.setdefault(key.strip(), []).append(value.strip())
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    for path in directives.get("EnvironmentFile", []):
        for line in Path(path.lstrip("-")).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, value = line.split("=", 1)
                env[key] = value
    for value in directives.get("Environment", []):
        env.update(item.split("=", 1) for item in shlex.split(value))
    (exec_start,) = directives["ExecStart"]
    argv = [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word) for word in shlex.split(exec_start)]
    return {
        "argv": argv,
        "env": env,
        "user": directives["User"][0],
        "group": directives["Group"][0],
        "cwd": directives["WorkingDirectory"][0],
        "umask": int(directives.get("UMask", ["0022"])[0], 8),
    }


def second_version(run_dir: Path, work: Path, registry: str) -> str:
    """Publish a copy of run_dir with other metrics: a new version with other content."""
    copy = work / "run-v2"
    shutil.copytree(run_dir, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["accuracy"] = 0.8438
    (copy / "metrics.json").write_text(json.dumps(metrics))
    return publish_run(copy, registry)["version"]


@pytest.fixture(scope="module")
def deployed(
    s3_server: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[dict]:
    """deploy/bootstrap.sh run as root into a throwaway prefix (system user, serving install, state, env file, model
    pulled from moto's S3, nginx site with basic auth); then the service started as its unit would be, and nginx
    from the prefix."""
    registry = f"s3://test-{uuid.uuid4().hex[:16]}/models"
    version = publish_run(shared_run(tmp_path_factory), registry)["version"]
    # Outside pytest's tmp folder, which only root may enter: the service user must reach its state here.
    prefix = Path(tempfile.mkdtemp(prefix="har-bootstrap-"))
    prefix.chmod(0o755)
    user = f"hartest{uuid.uuid4().hex[:6]}"
    voila_port, https_port, http_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "HAR_REGISTRY": registry,
        "HAR_MODEL_NAME": MODEL_NAME,
        "HAR_APP_DIR": str(serving_app(request.config)),  # a copy of the code, its .venv the base install
        "HAR_USER": user,
        "HAR_STATE_DIR": str(prefix / "state"),
        "HAR_ENV_FILE": str(prefix / "etc" / "har-dashboard.env"),
        "HAR_PORT": str(voila_port),
        "HAR_MAX_KERNELS": "3",
        "HAR_THREADS": "1",
        "HAR_SKIP_APT": "1",
        "HAR_BOOTSTRAP_NO_SYSTEMD": "1",
        "HAR_NGINX_DIR": str(debian_nginx_copy(prefix)),
        "HAR_ACME_ROOT": str(prefix / "acme"),
        "HAR_BASIC_AUTH_USER": AUTH[0],
        "HAR_BASIC_AUTH_PASSWORD": AUTH[1],
        "HAR_DOMAIN": "localhost",  # the self-signed certificate's name
        "HAR_PROXY_ADDR": "127.0.0.1",
        "HAR_HTTPS_PORT": str(https_port),
        "HAR_HTTP_PORT": str(http_port),
    }
    procs: list[subprocess.Popen] = []
    logs = open(prefix / "service.log", "w")
    try:
        done = subprocess.run(
            ["bash", str(BOOTSTRAP), "--no-start"], env=env, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, done.stderr
        nginx_conf = prefix / "nginx" / "nginx.conf"
        unit = unit_process(prefix / "state" / "har-dashboard.service")
        procs.append(
            subprocess.Popen(
                unit["argv"],
                env=unit["env"],
                cwd=unit["cwd"],
                user=unit["user"],
                group=unit["group"],
                extra_groups=[],
                umask=unit["umask"],
                stdout=logs,
                stderr=subprocess.STDOUT,
            )
        )
        procs.append(subprocess.Popen(["nginx", "-c", str(nginx_conf), "-g", "daemon off;"], stderr=logs))
        wait_for_port(https_port, procs[1], timeout_s=20)
        # nginx answers 502 until Voila listens: a test that starts at once must not meet that.
        wait_http(f"http://127.0.0.1:{voila_port}/health", procs[0], timeout=120)
        with requests.Session() as https:
            https.trust_env = False
            https.verify = str(prefix / "nginx" / "har-dashboard" / "selfsigned.crt")  # the one bootstrap made
            yield {
                "prefix": prefix,
                "env": env,
                "user": user,
                "version": version,
                "registry": registry,
                "output": done.stdout + done.stderr,
                "nginx_conf": nginx_conf,
                "unit": unit,
                "voila": procs[0],
                "voila_url": f"http://127.0.0.1:{voila_port}/",
                "url": f"https://localhost:{https_port}/",
                "https": https,
            }
    finally:
        for proc in reversed(procs):
            stop(proc)
        logs.close()
        print((prefix / "service.log").read_text()[-3000:])  # shown by pytest when a test failed
        subprocess.run(["userdel", user], capture_output=True)
        shutil.rmtree(prefix, ignore_errors=True)


@needs_root
@pytest.mark.integration
def test_bootstrap_as_root_sets_up_user_state_and_proxy(deployed: dict):
    prefix, user, env = deployed["prefix"], deployed["user"], deployed["env"]
    account = pwd.getpwnam(user)
    assert account.pw_uid < 1000 and account.pw_shell == "/usr/sbin/nologin"  # a system user without a login
    assert account.pw_dir == str(prefix / "state")
    state = (prefix / "state").stat()
    assert state.st_uid == account.pw_uid and stat.S_IMODE(state.st_mode) == 0o750
    env_path = prefix / "etc" / "har-dashboard.env"
    info = env_path.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, account.pw_gid, 0o640)
    settings = dict(line.split("=", 1) for line in env_path.read_text().splitlines() if line and line[0] != "#")
    assert settings["HAR_BIND"] == "127.0.0.1" and settings["HAR_MAX_KERNELS"] == "3"
    assert "HAR_KERNEL_IDLE_SECONDS" not in settings  # unset: the dashboard's own default applies
    link = Path(settings["HAR_MODEL_DIR"])
    assert link == prefix / "state" / "current-model" and link.is_symlink()
    pulled = link.resolve()
    assert pulled.name == deployed["version"] and (pulled / "model" / "config.json").is_file()
    assert pulled.is_relative_to(prefix / "state" / "registry-cache") and pulled.stat().st_uid == account.pw_uid
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in env_path.read_text()

    nginx_dir = Path(env["HAR_NGINX_DIR"])
    site = (nginx_dir / "conf.d" / "har-dashboard.conf").read_text()
    assert f"server 127.0.0.1:{env['HAR_PORT']};" in site and "client_max_body_size 20480k;" in site
    assert not (nginx_dir / "sites-enabled" / "default").exists()  # Debian's default site also claims port 80
    htpasswd = nginx_dir / "har-dashboard" / "htpasswd"
    info = htpasswd.stat()
    assert (info.st_uid, grp.getgrgid(info.st_gid).gr_name, stat.S_IMODE(info.st_mode)) == (0, "www-data", 0o640)
    assert htpasswd.read_text().startswith(f"{AUTH[0]}:$6$") and AUTH[1] not in htpasswd.read_text()
    assert stat.S_IMODE((nginx_dir / "har-dashboard" / "selfsigned.key").stat().st_mode) == 0o600
    check = subprocess.run(["nginx", "-t", "-c", str(deployed["nginx_conf"])], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr  # the site inside Debian's own nginx.conf
    assert AUTH[1] not in deployed["output"] and os.environ["AWS_SECRET_ACCESS_KEY"] not in deployed["output"]


@needs_root
@pytest.mark.integration
def test_service_started_as_its_unit_answers_through_nginx(deployed: dict):
    unit, https = deployed["unit"], deployed["https"]
    assert unit["user"] == deployed["user"] and "--Voila.ip=127.0.0.1" in unit["argv"]
    health = wait_http(deployed["voila_url"] + "health", deployed["voila"], timeout=120).json()
    assert health["status"] == "ok" and health["kernels"] == 0
    assert https.get(deployed["url"] + "health", timeout=30).status_code == 200  # no login for the balancer
    assert https.get(deployed["url"], timeout=30).status_code == 401
    page = https.get(deployed["url"], auth=AUTH, timeout=120)
    assert page.status_code == 200 and "harUploadGuard" in page.text and "dashboard is unavailable" not in page.text
    # the kernel runs as the service user too
    kernels = [
        p
        for p in psutil.Process(deployed["voila"].pid).children(recursive=True)
        if "ipykernel" in " ".join(p.cmdline())
    ]
    assert kernels and {p.username() for p in kernels} == {deployed["user"]}


@needs_root
@pytest.mark.integration
@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium missing (apt-get install -y chromium)")
def test_model_only_rolls_a_new_version_without_downtime(deployed: dict, tmp_path_factory: pytest.TempPathFactory):
    from playwright.sync_api import sync_playwright

    old = deployed["version"]
    new = second_version(shared_run(tmp_path_factory), tmp_path_factory.mktemp("roll"), deployed["registry"])
    # Every setting comes from the env file the first run wrote.
    env = {**base_env(), "HAR_ENV_FILE": deployed["env"]["HAR_ENV_FILE"], "HAR_SKIP_APT": "1"}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(**launch_options())
        context = browser.new_context(
            ignore_https_errors=True, http_credentials=dict(zip(("username", "password"), AUTH))
        )
        context.set_default_timeout(90_000)
        before = context.new_page()  # a visitor who opened the page before the roll
        before.goto(deployed["url"])
        assert before.wait_for_selector(".har-model-info").get_attribute("data-version") == old

        done = run_bootstrap(env, "--model-only")
        assert done.returncode == 0, done.stderr
        assert (deployed["prefix"] / "state" / "current-model").resolve().name == new
        assert deployed["voila"].poll() is None  # the server was not restarted

        after = context.new_page()  # a new page load gets the new version
        after.goto(deployed["url"])
        assert after.wait_for_selector(".har-model-info").get_attribute("data-version") == new
        # the open page keeps its kernel and its model, and still classifies
        with before.expect_file_chooser() as chooser:
            before.click(".har-upload")
        chooser.value.set_files([{"name": "after-roll.jpg", "mimeType": "image/jpeg", "buffer": photo(4)}])
        card = before.wait_for_selector(".har-results .har-result")
        assert card.get_attribute("data-name") == "after-roll.jpg" and old in card.inner_text()
        browser.close()


def site_of(env: dict[str, str]) -> str:
    """The nginx site the bootstrap wrote."""
    return (Path(env["HAR_NGINX_DIR"]) / "conf.d" / "har-dashboard.conf").read_text()


@needs_root
@pytest.mark.integration
def test_a_rerun_given_nothing_keeps_every_setting(
    s3_server: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
):
    from test_proxy import self_signed

    registry = f"s3://test-{uuid.uuid4().hex[:16]}/models"
    first_version = publish_run(shared_run(tmp_path_factory), registry)["version"]
    prefix = Path(tempfile.mkdtemp(prefix="har-rerun-"))  # outside pytest's root-only folder, as in `deployed`
    prefix.chmod(0o755)
    user = f"hartest{uuid.uuid4().hex[:6]}"
    domain = "har.example.test"
    # A certificate where certbot keeps Let's Encrypt's: the bootstrap serves it with HSTS and runs no certbot.
    live = prefix / "letsencrypt" / "live" / domain
    cert, key = self_signed(live, domain)
    cert.rename(live / "fullchain.pem")
    key.rename(live / "privkey.pem")
    env_file = prefix / "etc" / "har-dashboard.env"
    switches = {
        "HAR_ENV_FILE": str(env_file),
        "HAR_SKIP_APT": "1",
        "HAR_SKIP_PIP": "1",
        "HAR_BOOTSTRAP_NO_SYSTEMD": "1",
    }
    settings = {
        "HAR_REGISTRY": registry,
        "HAR_MODEL_NAME": MODEL_NAME,
        "HAR_APP_DIR": str(serving_app(request.config)),
        "HAR_USER": user,
        "HAR_STATE_DIR": str(prefix / "state"),
        "HAR_PORT": str(free_port()),
        "HAR_NGINX_DIR": str(debian_nginx_copy(prefix)),
        "HAR_ACME_ROOT": str(prefix / "acme"),
        "HAR_LETSENCRYPT_DIR": str(prefix / "letsencrypt"),
        "HAR_DOMAIN": domain,
        "HAR_CERT_EMAIL": "ops@example.test",
        "HAR_BASIC_AUTH_USER": AUTH[0],
        "HAR_BASIC_AUTH_PASSWORD": AUTH[1],
        "HAR_PROXY_ADDR": "127.0.0.1",
        "HAR_HTTPS_PORT": str(free_port()),
        "HAR_HTTP_PORT": str(free_port()),
        # Limits unlike every default, so that a default taking a limit's place shows.
        "HAR_PROXY_PAGE_RATE": "7r/m",
        "HAR_PROXY_PAGE_BURST": "3",
        "HAR_PROXY_MAX_SOCKETS": "2",
        "HAR_PROXY_MAX_CONNS": "9",
        "HAR_PROXY_TRUSTED_CIDR": "10.9.0.0/16",
        "HAR_MAX_UPLOAD_MIB": "7",
        "HAR_MAX_KERNELS": "5",
        "HAR_KERNEL_IDLE_SECONDS": "300",
        "HAR_TOP_K": "3",
        "HAR_THREADS": "1",
    }
    tls_dir = Path(settings["HAR_NGINX_DIR"]) / "har-dashboard"
    outputs = []
    try:
        done = run_bootstrap({**base_env(), **switches, **settings}, "--no-start")
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr
        site, env_text, htpasswd = site_of(settings), env_file.read_text(), (tls_dir / "htpasswd").read_text()
        assert f"auth_basic_user_file {tls_dir}/htpasswd;" in site
        assert f"ssl_certificate {live}/fullchain.pem;" in site and "Strict-Transport-Security" in site
        for line in (
            "rate=7r/m;",
            "burst=3 nodelay;",
            "limit_conn har_socket_conns 2;",
            "limit_conn har_conns 9;",
            "set_real_ip_from 10.9.0.0/16;",
            "client_max_body_size 7168k;",
        ):
            assert line in site, line

        # A re-run given nothing but where the env file is: login, certificate, HSTS and every limit stay as they were.
        done = run_bootstrap({**base_env(), **switches}, "--no-start")
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr
        assert site_of(settings) == site
        assert env_file.read_text() == env_text
        assert (tls_dir / "htpasswd").read_text() == htpasswd  # the same password, not a new one
        assert "kept from" in done.stderr and "HAR_BASIC_AUTH_USER" in done.stderr

        # A setting given anew replaces the kept one; the rest stay.
        done = run_bootstrap({**base_env(), **switches, "HAR_MAX_KERNELS": "4"}, "--no-start")
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr
        assert "HAR_MAX_KERNELS=4\n" in env_file.read_text() and "HAR_TOP_K=3\n" in env_file.read_text()
        assert site_of(settings) == site

        # A pinned version stays pinned: a later run given nothing does not move to the newest version.
        second_version(shared_run(tmp_path_factory), tmp_path_factory.mktemp("pin"), registry)
        current = prefix / "state" / "current-model"
        done = run_bootstrap({**base_env(), **switches, "HAR_MODEL_VERSION": first_version}, "--model-only")
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr
        done = run_bootstrap({**base_env(), **switches}, "--no-start")
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr
        assert current.resolve().name == first_version

        # An env file that records no login (written before settings were kept, or edited) does not open the site.
        kept = env_file.read_text()
        env_file.write_text("".join(line for line in kept.splitlines(True) if "BASIC_AUTH" not in line))
        done = run_bootstrap({**base_env(), **switches}, "--no-start")
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 2 and "--no-login" in done.stderr
        assert site_of(settings) == site
        env_file.write_text(kept)
        # Nor does HAR_PROXY=none without its flag.
        done = run_bootstrap({**base_env(), **switches, "HAR_PROXY": "none"}, "--no-start")
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 2 and "--no-proxy" in done.stderr
        assert site_of(settings) == site

        # Login and TLS go off only by their flags, which say so; each stays off on later runs.
        done = run_bootstrap({**base_env(), **switches}, "--no-start", "--no-login")
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr
        assert "login is turned OFF" in done.stderr
        open_site = site_of(settings)
        assert "auth_basic off;" in open_site and "auth_basic_user_file" not in open_site
        assert "Strict-Transport-Security" in open_site and "rate=7r/m;" in open_site
        done = run_bootstrap({**base_env(), **switches}, "--no-start", "--self-signed")
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr
        assert "HSTS" in done.stderr and "self-signed" in done.stderr
        plain = site_of(settings)
        assert f"ssl_certificate {tls_dir}/selfsigned.crt;" in plain and "Strict-Transport-Security" not in plain
        done = run_bootstrap({**base_env(), **switches}, "--no-start")
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr
        assert site_of(settings) == plain
        # A new name gets its own self-signed certificate, not the old name's.
        done = run_bootstrap({**base_env(), **switches, "HAR_DOMAIN": "other.example.test"}, "--no-start")
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr
        subject = subprocess.run(
            ["openssl", "x509", "-noout", "-subject", "-in", str(tls_dir / "selfsigned.crt")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "other.example.test" in subject and "server_name other.example.test;" in site_of(settings)
        check = subprocess.run(
            ["nginx", "-t", "-c", str(prefix / "nginx" / "nginx.conf")], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stderr
        for text in outputs + [env_file.read_text()]:
            assert AUTH[1] not in text and os.environ["AWS_SECRET_ACCESS_KEY"] not in text
    finally:
        subprocess.run(["userdel", user], capture_output=True)
        shutil.rmtree(prefix, ignore_errors=True)
