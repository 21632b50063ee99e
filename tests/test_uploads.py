"""Decoding of user uploads (every bad-input case, with generated files) and the guarded URL fetcher."""

from __future__ import annotations

import http.server
import io
import ipaddress
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from lib.dashboard.uploads import MIB, UploadError, check_url, decode_image, fetch_url, is_public_address

MAX = 20 * MIB
PIXELS = 40_000_000


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    """Image to bytes in a given format."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def jpeg(w: int = 64, h: int = 48, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A small RGB JPEG with some texture."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[...] = color
    arr[: h // 2, : w // 2] = (20, 200, 20)
    return encode(Image.fromarray(arr), "JPEG", quality=90)


def test_valid_jpeg_decodes_to_rgb():
    img = decode_image(jpeg(64, 48), MAX, PIXELS)
    assert img.mode == "RGB" and img.size == (64, 48)
    assert img.info["animated"] is False


def test_empty_file_is_refused():
    with pytest.raises(UploadError, match="empty"):
        decode_image(b"", MAX, PIXELS)


def test_file_over_the_size_cap_is_refused_before_decoding():
    data = jpeg() + b"\0" * (2 * MIB)
    with pytest.raises(UploadError, match=r"limit is 1\.0 MiB"):
        decode_image(data, 1 * MIB, PIXELS)


@pytest.mark.parametrize("data", [b"hello, this is text\n" * 10, b"%PDF-1.4\n" + b"x" * 200, b"\x00" * 100])
def test_not_an_image(data: bytes):
    with pytest.raises(UploadError, match="not an image"):
        decode_image(data, MAX, PIXELS)


def test_heic_gets_a_specific_hint():
    data = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    with pytest.raises(UploadError, match="HEIC"):
        decode_image(data, MAX, PIXELS)


def test_truncated_jpeg_is_refused():
    data = jpeg(256, 256)
    with pytest.raises(UploadError, match="damaged or truncated"):
        decode_image(data[: len(data) // 2], MAX, PIXELS)


def test_corrupt_jpeg_header_is_refused():
    data = bytearray(jpeg(128, 128))
    data[2:40] = b"\xff" * 38  # wreck the segment headers after SOI
    with pytest.raises(UploadError):
        decode_image(bytes(data), MAX, PIXELS)


def test_truncated_png_is_refused():
    data = encode(Image.new("RGB", (200, 200), (1, 2, 3)), "PNG")
    with pytest.raises(UploadError, match="damaged or truncated"):
        decode_image(data[:-40], MAX, PIXELS)


def test_decompression_bomb_is_refused_by_pixel_cap():
    data = encode(Image.new("L", (6000, 6000), 0), "PNG")  # 36 MP that compresses to a few KiB
    assert len(data) < 200_000
    with pytest.raises(UploadError, match="megapixels"):
        decode_image(data, MAX, 10_000_000)


def test_decompression_bomb_error_from_pillow_is_caught(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(Image.new("L", (100, 100), 0), "PNG")  # 10000 px > 2 x 1000: Pillow raises
    with pytest.raises(UploadError, match="too many pixels"):
        decode_image(data, MAX, PIXELS)
    data = encode(Image.new("L", (40, 40), 0), "PNG")  # 1600 px: Pillow only warns, treated as an error
    with pytest.raises(UploadError, match="too many pixels"):
        decode_image(data, MAX, PIXELS)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    img = decode_image(data, MAX, PIXELS)
    assert img.info["animated"] is True
    r, g, b = img.getpixel((16, 16))
    assert r > 200 and g < 50 and b < 50


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG")  # pure red in CMYK
    img = decode_image(data, MAX, PIXELS)
    assert img.mode == "RGB" and img.size == (40, 30)
    r, g, b = img.getpixel((20, 15))
    assert r > 180 and g < 80 and b < 80


def test_16_bit_png_is_rescaled_to_8_bit():
    arr = np.full((20, 30), 65535, np.uint16)
    arr[:, :15] = 0
    data = encode(Image.fromarray(arr), "PNG")  # uint16 -> mode I;16
    img = decode_image(data, MAX, PIXELS)
    assert img.mode == "RGB" and img.size == (30, 20)
    assert img.getpixel((25, 10)) == (255, 255, 255) and img.getpixel((5, 10)) == (0, 0, 0)


def test_palette_png_with_transparency_goes_on_white():
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    data = encode(pal, "PNG", transparency=0)
    img = decode_image(data, MAX, PIXELS)
    assert img.mode == "RGB" and img.getpixel((5, 5)) == (255, 255, 255)


def test_rgba_png_goes_on_white():
    rgba = Image.new("RGBA", (20, 20), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 10, 20))
    img = decode_image(encode(rgba, "PNG"), MAX, PIXELS)
    assert img.getpixel((15, 5)) == (255, 255, 255) and img.getpixel((5, 5)) == (0, 0, 255)


@pytest.mark.parametrize("mode", ["L", "LA", "1", "I", "F"])
def test_other_modes_become_rgb(mode: str):
    fmt = "TIFF" if mode in ("I", "F") else "PNG"
    img = decode_image(encode(Image.new(mode, (12, 10)), fmt), MAX, PIXELS)
    assert img.mode == "RGB" and img.size == (12, 10)


def test_exif_orientation_is_applied():
    src = Image.new("RGB", (40, 20), (255, 0, 0))
    src.paste((0, 0, 255), (0, 0, 10, 20))  # blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img = decode_image(encode(src, "JPEG", exif=exif.tobytes(), quality=95), MAX, PIXELS)
    assert img.size == (20, 40)
    r, g, b = img.getpixel((10, 3))  # the left band is now on top
    assert b > 200 and r < 60


def test_max_side_shrinks_large_photos():
    img = decode_image(jpeg(3000, 2000), MAX, PIXELS, max_side=512)
    assert max(img.size) <= 512 and img.size[0] > img.size[1]


# --------------------------------------------------------------------------- URL guard


@pytest.mark.parametrize(
    "addr,public",
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("fd00:ec2::254", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("2002:7f00:1::", False),  # 6to4 wrapping 127.0.0.1
        ("2002:a9fe:a9fe::", False),  # 6to4 wrapping 169.254.169.254
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 wrapping 169.254.169.254
    ],
)
def test_is_public_address(addr: str, public: bool):
    assert is_public_address(ipaddress.ip_address(addr)) is public


def fake_dns(table: dict[str, list[str]]):
    """A resolver answering from a table."""
    return lambda host, port: table[host]


@pytest.mark.parametrize(
    "url,match",
    [
        ("file:///etc/passwd", "Only http"),
        ("ftp://example.com/a.jpg", "Only http"),
        ("gopher://example.com/", "Only http"),
        ("javascript:alert(1)", "Only http"),
        ("http:///nohost.jpg", "no host"),
        ("http://127.0.0.1/a.jpg", "private or reserved"),
        ("http://169.254.169.254/latest/meta-data/", "private or reserved"),
        ("http://[::1]/a.jpg", "private or reserved"),
        ("http://[::ffff:127.0.0.1]/a.jpg", "private or reserved"),
        ("http://[fd00:ec2::254]/latest/", "private or reserved"),
        ("http://224.0.0.1/a.jpg", "private or reserved"),
        ("http://user:pw@example.com/a.jpg", "user name or password"),
        ("http://example.com:22/a.jpg", "Port 22"),
        ("http://example.com:99999/a.jpg", "valid URL"),
        ("http://internal.test/a.jpg", "private or reserved"),
        ("http://mixed.test/a.jpg", "private or reserved"),
    ],
)
def test_check_url_refusals(url: str, match: str):
    dns = fake_dns(
        {"example.com": ["93.184.215.14"], "internal.test": ["10.0.0.5"], "mixed.test": ["93.184.215.14", "127.0.0.1"]}
    )
    with pytest.raises(UploadError, match=match):
        check_url(url, resolve=dns)


def test_numeric_host_spellings_resolve_to_loopback_and_are_refused():
    for url in ("http://2130706433/", "http://0x7f000001/", "http://localhost/a.jpg"):
        with pytest.raises(UploadError):
            check_url(url)


def test_check_url_returns_the_checked_ip():
    scheme, host, port, ip, target = check_url(
        "https://Example.com/a/b.jpg?x=1", resolve=fake_dns({"example.com": ["93.184.215.14"]})
    )
    assert (scheme, host, port, ip, target) == ("https", "example.com", 443, "93.184.215.14", "/a/b.jpg?x=1")


class _Handler(http.server.BaseHTTPRequestHandler):
    """Test image server: paths pick the behaviour."""

    seen_hosts: list[str] = []

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}) and "Transfer-Encoding" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        _Handler.seen_hosts.append(self.headers.get("Host", ""))
        port = self.server.server_address[1]
        if self.path == "/img.jpg":
            self._send(200, jpeg(), {"Content-Type": "image/jpeg"})
        elif self.path == "/redirect-ok":
            self._send(302, headers={"Location": "/img.jpg"})
        elif self.path == "/redirect-metadata":
            self._send(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
        elif self.path == "/redirect-loop":
            self._send(302, headers={"Location": f"http://img.test:{port}/redirect-loop"})
        elif self.path == "/redirect-file":
            self._send(302, headers={"Location": "file:///etc/passwd"})
        elif self.path == "/page":
            self._send(200, b"<html></html>", {"Content-Type": "text/html; charset=utf-8"})
        elif self.path == "/big-declared":
            self._send(200, b"", {"Content-Type": "image/jpeg", "Content-Length": str(50 * MIB)})
        elif self.path == "/big-chunked":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"\xff" * 65536
            try:
                for _ in range(64):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"x" * 10)
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass
        else:
            self._send(404, b"nope")


@pytest.fixture(scope="module")
def image_server() -> Iterator[int]:
    """A local HTTP server on 127.0.0.1; yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def loopback_ok(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Test policy: the local test server counts as public, everything else as usual."""
    return ip.is_loopback or is_public_address(ip)


def fetch(port: int, path: str, **kwargs) -> bytes:
    """Fetch from the local test server under the name img.test (resolved by a fake DNS)."""
    kwargs.setdefault("max_bytes", MAX)
    return fetch_url(
        f"http://img.test:{port}{path}",
        resolve=fake_dns({"img.test": ["127.0.0.1"]}),
        allow=loopback_ok,
        allowed_ports=frozenset({port}),
        **kwargs,
    )


def test_fetch_connects_to_the_checked_ip_with_the_original_host(image_server: int):
    _Handler.seen_hosts.clear()
    data = fetch(image_server, "/img.jpg")
    assert decode_image(data, MAX, PIXELS).size == (64, 48)
    assert _Handler.seen_hosts == [f"img.test:{image_server}"]


def test_fetch_follows_a_safe_redirect(image_server: int):
    assert decode_image(fetch(image_server, "/redirect-ok"), MAX, PIXELS).size == (64, 48)


@pytest.mark.parametrize(
    "path,match",
    [
        ("/redirect-metadata", "private or reserved"),
        ("/redirect-file", "Only http"),
        ("/redirect-loop", "Too many redirects"),
        ("/page", "web page"),
        ("/big-declared", "limit is"),
        ("/big-chunked", "larger than the limit"),
        ("/missing", "HTTP 404"),
    ],
)
def test_fetch_refusals(image_server: int, path: str, match: str):
    with pytest.raises(UploadError, match=match):
        fetch(image_server, path, max_bytes=1 * MIB)


def test_fetch_total_time_is_capped(image_server: int):
    start = time.monotonic()
    with pytest.raises(UploadError, match="too long"):
        fetch(image_server, "/slow", timeout=1.0)
    assert time.monotonic() - start < 3


def test_fetch_refuses_loopback_under_the_default_policy(image_server: int):
    with pytest.raises(UploadError, match="private or reserved"):
        fetch_url(f"http://127.0.0.1:{image_server}/img.jpg", MAX, allowed_ports=frozenset({image_server}))
