"""nginx in front of Voila (deploy/nginx/): the rendered configuration passes `nginx -t`, and a real nginx on
loopback serves the dashboard over HTTPS (self-signed certificate) with basic auth, websockets, per-client limits,
the HTTP body cap and /health without login."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
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
    voila_command,
)

from lib.dashboard.headless import CHROMIUM, launch_options, wait_for_port
from lib.params import ROOT
from tools.rehearsal.runner import HAR_SAMPLE

pytestmark = pytest.mark.skipif(not shutil.which("nginx"), reason="nginx missing (apt-get install -y nginx)")

RENDER = ROOT / "deploy" / "nginx" / "render.sh"
TOP_K = 5
MAX_UPLOAD_MIB = 2
USER, PASSWORD = "visitor", "correct horse battery staple"
PAGE_BURST = 5  # render.sh's default HAR_PROXY_PAGE_BURST: page loads let through at once
PAGE_RATE_S = 60 / 10  # render.sh's default HAR_PROXY_PAGE_RATE, 10r/m: one more page load every 6 s
SOCKET_BURST = 10  # the template's burst for websocket opens
SOCKET_RATE_S = 60 / 30  # the template's websocket rate, 30r/m


def let_through(burst: int, every_s: float, elapsed_s: float) -> int:
    """The most requests nginx's limit_req (burst, nodelay) lets through in elapsed_s: the first, the burst, and
    one more for every started interval of the rate (a slow machine spreads the requests, and the limit refills)."""
    return 1 + burst + math.ceil(elapsed_s / every_s)


# --------------------------------------------------------------------------- helpers (test_deploy uses them)


def self_signed(folder: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A throwaway self-signed certificate for name and 127.0.0.1: (certificate, key)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}"]
        + ["-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


def write_htpasswd(path: Path, user: str, password: str) -> Path:
    """An nginx user file with one SHA-512-crypt entry (the form bootstrap.sh writes)."""
    hashed = subprocess.run(
        ["openssl", "passwd", "-6", "-stdin"], input=password, capture_output=True, text=True, check=True
    ).stdout.strip()
    path.write_text(f"{user}:{hashed}\n")
    return path


def render(env: dict[str, str]) -> str:
    """deploy/nginx/render.sh's output for these HAR_* variables."""
    done = subprocess.run(
        ["bash", str(RENDER)], env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True
    )
    if done.returncode:
        raise ValueError(done.stderr.strip())
    return done.stdout


def harness(folder: Path, site: str) -> Path:
    """A main nginx.conf around the rendered site for a foreground nginx in folder (pid, logs, temp files there)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "har-dashboard.conf").write_text(site)
    temp = " ".join(
        f"{kind}_temp_path {folder / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root root;" if os.geteuid() == 0 else ""  # workers read the throwaway files as the test's user
    conf = folder / "nginx.conf"
    conf.write_text(
        f"{user}\ndaemon off;\nworker_processes 1;\npid {folder / 'nginx.pid'};\n"
        f"error_log {folder / 'error.log'} warn;\n"
        "events { worker_connections 256; }\n"
        f"http {{\n  access_log {folder / 'access.log'};\n  {temp}\n  include {folder / 'har-dashboard.conf'};\n}}\n"
    )
    return conf


def nginx_check(conf: Path) -> subprocess.CompletedProcess:
    """`nginx -t` of a main configuration file."""
    return subprocess.run(["nginx", "-t", "-c", str(conf)], capture_output=True, text=True)


def start_nginx(conf: Path, port: int) -> subprocess.Popen:
    """nginx in the foreground (a child we can stop), once it accepts connections on port."""
    proc = subprocess.Popen(["nginx", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc, timeout_s=20)
    return proc


def kernels(pid: int) -> int:
    """ipykernel processes under the Voila server pid."""
    count = 0
    for child in psutil.Process(pid).children(recursive=True):
        try:
            count += child.status() != psutil.STATUS_ZOMBIE and "ipykernel_launcher" in " ".join(child.cmdline())
        except psutil.Error:
            pass
    return count


# --------------------------------------------------------------------------- the configuration alone


def test_rendered_configuration_passes_nginx_t(tmp_path: Path):
    cert, key = self_signed(tmp_path / "tls")
    base = {"HAR_TLS_CERT": str(cert), "HAR_TLS_KEY": str(key), "HAR_PORT": "8866", "HAR_MAX_UPLOAD_MIB": "2.5"}
    open_site = render(base)
    assert not re.search(r"@[A-Z_]+@", open_site)
    assert "auth_basic off;" in open_site and "auth_basic_user_file" not in open_site
    assert "client_max_body_size 2560k;" in open_site  # 2.5 MiB, the dashboard's per-file cap
    assert "server 127.0.0.1:8866;" in open_site and "listen 443 ssl default_server;" in open_site
    assert "return 301 https://$host$request_uri;" in open_site
    check = nginx_check(harness(tmp_path / "open", open_site))
    assert check.returncode == 0, check.stderr

    users = write_htpasswd(tmp_path / "htpasswd", USER, PASSWORD)
    locked = render({**base, "HAR_HTPASSWD": str(users), "HAR_PROXY_TRUSTED_CIDR": "10.0.0.0/16", "HAR_HSTS": "1"})
    assert f"auth_basic_user_file {users};" in locked and "set_real_ip_from 10.0.0.0/16;" in locked
    assert "Strict-Transport-Security" in locked
    check = nginx_check(harness(tmp_path / "locked", locked))
    assert check.returncode == 0, check.stderr

    for name, value in (("HAR_DOMAIN", "evil.example; include /etc/shadow"), ("HAR_MAX_UPLOAD_MIB", "lots")):
        with pytest.raises(ValueError, match=name):  # nothing reaches nginx's syntax unchecked
            render({**base, name: value})
    with pytest.raises(ValueError, match="HAR_TLS_CERT"):
        render({"HAR_TLS_KEY": str(key)})


# --------------------------------------------------------------------------- nginx + Voila on loopback


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Voila on 127.0.0.1 behind nginx over HTTPS with basic auth; yields the URLs, the access log and Voila's pid."""
    tmp = tmp_path_factory.mktemp("proxy")
    publish_run(shared_run(tmp_path_factory), str(tmp / "registry"))
    voila_port, https_port, http_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "HAR_REGISTRY": str(tmp / "registry"),
        "HAR_MODEL_NAME": MODEL_NAME,
        "HAR_TOP_K": str(TOP_K),
        "HAR_MAX_UPLOAD_MIB": str(MAX_UPLOAD_MIB),
        "HAR_REGISTRY_CACHE": str(tmp / "cache"),
        "HAR_MAX_KERNELS": "3",
        "HAR_THREADS": "1",
    }
    cert, key = self_signed(tmp / "tls")
    site = render(
        {
            "HAR_TLS_CERT": str(cert),
            "HAR_TLS_KEY": str(key),
            "HAR_PORT": str(voila_port),
            "HAR_PROXY_ADDR": "127.0.0.1",
            "HAR_HTTPS_PORT": str(https_port),
            "HAR_HTTP_PORT": str(http_port),
            "HAR_MAX_UPLOAD_MIB": str(MAX_UPLOAD_MIB),
            "HAR_HTPASSWD": str(write_htpasswd(tmp / "htpasswd", USER, PASSWORD)),
            "HAR_ACME_ROOT": str(tmp / "acme"),
        }
    )
    conf = harness(tmp / "nginx", site)
    log = open(tmp / "voila.log", "w")
    voila = subprocess.Popen(voila_command(voila_port), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    nginx = None
    try:
        wait_for_port(voila_port, voila)
        nginx = start_nginx(conf, https_port)
        yield {
            "url": f"https://127.0.0.1:{https_port}/",
            "http_url": f"http://127.0.0.1:{http_port}/",
            "access_log": tmp / "nginx" / "access.log",
            "voila_pid": voila.pid,
            "cert": cert,
        }
    finally:
        if nginx is not None:
            stop(nginx)
        stop(voila)
        log.close()
        print((tmp / "voila.log").read_text()[-3000:])  # shown by pytest when a test failed
        print((tmp / "nginx" / "error.log").read_text()[-2000:] if (tmp / "nginx" / "error.log").exists() else "")


@pytest.fixture(scope="module")
def https(stack: dict) -> Iterator[requests.Session]:
    """A requests session that trusts the stack's self-signed certificate (and nothing from the environment)."""
    with requests.Session() as session:
        session.trust_env = False  # REQUESTS_CA_BUNDLE would replace the certificate below
        session.verify = str(stack["cert"])
        yield session


@pytest.mark.integration
def test_health_answers_without_login_or_kernel(stack: dict, https: requests.Session):
    before = kernels(stack["voila_pid"])
    for url in (stack["url"] + "health", stack["http_url"] + "health"):  # HTTPS, and plain HTTP for a balancer
        resp = https.get(url, timeout=30, allow_redirects=False)
        assert resp.status_code == 200, (url, resp.status_code)
    assert kernels(stack["voila_pid"]) == before


@pytest.mark.integration
def test_plain_http_moves_to_https(stack: dict, https: requests.Session):
    resp = https.get(stack["http_url"] + "?x=1", timeout=30, allow_redirects=False)
    assert resp.status_code == 301 and resp.headers["Location"] == stack["url"] + "?x=1"


@pytest.mark.integration
def test_login_is_required(stack: dict, https: requests.Session):
    for auth in (None, (USER, "wrong password")):
        resp = https.get(stack["url"], auth=auth, timeout=30)
        assert resp.status_code == 401 and resp.headers["WWW-Authenticate"].startswith("Basic")
    assert kernels(stack["voila_pid"]) == 0  # refused at the proxy: no kernel started


@pytest.mark.integration
def test_oversized_body_gets_413(stack: dict, https: requests.Session):
    cap = MAX_UPLOAD_MIB * 1024 * 1024
    big = https.post(stack["url"] + "voila/api/shutdown/x", data=b"\0" * (cap + 1), auth=(USER, PASSWORD), timeout=30)
    assert big.status_code == 413
    small = https.post(stack["url"] + "voila/api/shutdown/x", data=b"\0" * 1024, auth=(USER, PASSWORD), timeout=30)
    assert small.status_code not in (413, 429) and small.status_code >= 400  # Voila's own refusal (no XSRF token)


@pytest.mark.integration
@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium missing (apt-get install -y chromium)")
def test_browser_classifies_a_photo_through_the_proxy(stack: dict, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    real = sorted((HAR_SAMPLE / "running").glob("*.jpg"))
    data = real[0].read_bytes() if real else photo(11)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(**launch_options())
        context = browser.new_context(
            ignore_https_errors=True, http_credentials={"username": USER, "password": PASSWORD}
        )
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(stack["url"])
        page.wait_for_selector(".har-model-info", timeout=90_000)  # widgets render: the websocket works
        with page.expect_file_chooser() as chooser:
            page.click(".har-upload")
        chooser.value.set_files([{"name": "photo.jpg", "mimeType": "image/jpeg", "buffer": data}])
        card = page.wait_for_selector(".har-results .har-result", timeout=60_000)
        rows = card.query_selector_all(".har-pred")
        probs = [float(r.get_attribute("data-prob")) for r in rows]
        labels = [r.get_attribute("data-label") for r in rows]
        browser.close()
    assert len(rows) == TOP_K and probs == sorted(probs, reverse=True) and len(set(labels)) == TOP_K
    log = stack["access_log"].read_text()
    assert re.search(r'"GET /api/kernels/[0-9a-f-]+/channels[^"]* HTTP/1\.1" 101 ', log)  # websocket via nginx


@pytest.mark.integration
def test_page_loads_are_rate_limited(stack: dict, https: requests.Session):
    # HEAD of / passes the same limit as a page load, but Voila answers it (405) without starting a kernel.
    start = time.monotonic()
    statuses = [https.head(stack["url"], auth=(USER, PASSWORD), timeout=30).status_code for _ in range(4 * PAGE_BURST)]
    allowed = let_through(PAGE_BURST, PAGE_RATE_S, time.monotonic() - start)
    assert allowed < len(statuses), "the requests took too long to reach the limit"
    assert statuses[0] != 429 and len(statuses) - statuses.count(429) <= allowed, statuses
    assert set(statuses) - {429} <= {405}, statuses
    limited = https.get(stack["url"], auth=(USER, PASSWORD), timeout=30)
    assert limited.status_code == 429 and "nginx" in limited.text  # the proxy's page: Voila never saw it


@pytest.mark.integration
def test_websocket_opens_are_rate_limited(stack: dict, https: requests.Session):
    # An unknown kernel: Voila refuses each open at once, so only the proxy's counting is exercised.
    url = f"{stack['url']}api/kernels/{uuid.uuid4()}/channels"
    start = time.monotonic()
    statuses = [https.get(url, auth=(USER, PASSWORD), timeout=30).status_code for _ in range(3 * SOCKET_BURST)]
    allowed = let_through(SOCKET_BURST, SOCKET_RATE_S, time.monotonic() - start)
    assert allowed < len(statuses), "the requests took too long to reach the limit"
    assert statuses[0] != 429 and len(statuses) - statuses.count(429) <= allowed, statuses
