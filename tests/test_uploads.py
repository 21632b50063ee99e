"""Decoding of user uploads (every bad-input case, with generated files) and the guarded URL fetcher."""

from __future__ import annotations

import http.server
import io
import ipaddress
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import quote, unquote

import numpy as np
import pytest
from PIL import Image

from lib.dashboard import uploads
from lib.dashboard.uploads import (
    DECODE_FORMATS,
    MIB,
    UploadError,
    check_url,
    decode_image,
    fetch_url,
    is_public_address,
    resolve_host,
    url_origin,
)

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


def heic(img: Image.Image, orientation: int | None = None, quality: int = 90) -> bytes:
    """HEIC bytes written by pillow-heif; an EXIF orientation is stored as the container's rotation, as phones do."""
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    return encode(img, "HEIF", quality=quality, exif=exif.tobytes())


def banded(w: int = 40, h: int = 20) -> Image.Image:
    """Red with a blue band on the left: shows which way an image was turned."""
    img = Image.new("RGB", (w, h), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, w // 4, h))
    return img


def test_broken_heic_is_refused_naming_heic():
    data = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    with pytest.raises(UploadError, match="HEIC/HEIF photo is damaged"):
        decode_image(data, MAX, PIXELS)
    whole = heic(banded())
    # Half the file: HEVC decoders differ in how many trailing bytes they do without (libde265 1.1 decodes this
    # small image with its last 20 bytes cut), none decodes an image whose coded data is half gone.
    with pytest.raises(UploadError, match="damaged or truncated"):
        decode_image(whole[: len(whole) // 2], MAX, PIXELS)


def test_heic_without_pillow_heif_gets_the_export_hint(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(uploads, "pillow_heif", None)
    monkeypatch.setattr(uploads, "DECODE_FORMATS", tuple(f for f in DECODE_FORMATS if f != "HEIF"))
    with pytest.raises(UploadError, match="export the photo as JPEG"):
        decode_image(heic(banded()), MAX, PIXELS)


@pytest.mark.parametrize("max_side", [None, 512])  # 512: the reduce-then-rotate path of large photos
def test_heic_photo_decodes_with_its_rotation(max_side: int | None):
    scale = 1 if max_side is None else 60
    img = decode_image(heic(banded(40 * scale, 20 * scale), orientation=6, quality=95), MAX, PIXELS, max_side)
    w, h = img.size
    assert img.mode == "RGB" and h == 2 * w and h == (40 if max_side is None else 512)
    r, g, b = img.getpixel((w // 2, h // 16))  # the left band is now on top, turned once (not twice)
    assert b > 200 and r < 60
    assert img.getpixel((w // 2, h - h // 16))[0] > 200


def psd(w: int = 8, h: int = 6) -> bytes:
    """A minimal RGB Photoshop file (raw channels), which Pillow's PSD plugin would decode."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 8, 3)  # version 1, 3 channels, 8 bits, RGB
    sections = struct.pack(">III", 0, 0, 0)  # colour mode data, image resources, layers: all empty
    return header + sections + struct.pack(">H", 0) + bytes(3 * w * h)  # compression 0: raw planes


def fits(w: int = 4, h: int = 3) -> bytes:
    """A minimal 8-bit FITS image."""
    cards = ["SIMPLE  =                    T", "BITPIX  =                    8", "NAXIS   =                    2"]
    cards += [f"NAXIS1  = {w:>20}", f"NAXIS2  = {h:>20}", "END"]
    header = "".join(c.ljust(80) for c in cards).ljust(2880).encode("ascii")
    return header + bytes(w * h).ljust(2880, b"\0")


def refused_samples() -> dict[str, bytes]:
    """Files in formats Pillow knows but the dashboard does not accept (each would be uploaded as 'photo.jpg')."""
    small = Image.new("RGB", (16, 12), (90, 120, 30))
    return {
        "PSD": psd(),
        "EPS": encode(small, "EPS"),
        "FITS": fits(),
        "ICO": encode(small, "ICO"),
        "PCX": encode(small, "PCX"),
        "TGA": encode(small, "TGA"),
        "PPM": encode(small, "PPM"),
        "SGI": encode(small, "SGI"),
    }


@pytest.fixture
def other_decoders(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every Pillow opener outside the allowlist, replaced by one that records that it was asked."""
    Image.init()
    asked: list[str] = []

    def recorder(fmt: str) -> Callable[..., Image.Image]:
        def factory(*_args, **_kwargs) -> Image.Image:
            asked.append(fmt)
            raise SyntaxError(f"{fmt} must not be tried")

        return factory

    for fmt, (_factory, accept) in list(Image.OPEN.items()):
        if fmt not in DECODE_FORMATS:
            monkeypatch.setitem(Image.OPEN, fmt, (recorder(fmt), accept))
    return asked


@pytest.mark.parametrize("fmt", list(refused_samples()))
def test_formats_outside_the_allowlist_are_never_decoded(fmt: str, other_decoders: list[str]):
    data = refused_samples()[fmt]
    with pytest.raises(UploadError) as err:
        decode_image(data, MAX, PIXELS)
    message = str(err.value)
    assert "JPEG, PNG, WebP, GIF, BMP, TIFF or HEIC/HEIF" in message  # names what is accepted
    assert other_decoders == []  # no parser outside the allowlist saw the bytes


@pytest.mark.parametrize("fmt,name", [("PSD", "Photoshop (PSD)"), ("EPS", "PostScript/EPS"), ("FITS", "FITS")])
def test_refused_format_is_named(fmt: str, name: str):
    with pytest.raises(UploadError) as err:
        decode_image(refused_samples()[fmt], MAX, PIXELS)
    assert f"This is a {name} file" in str(err.value)


@pytest.mark.parametrize(
    "fmt,kwargs",
    [
        ("JPEG", {"quality": 90}),
        ("MPO", {}),  # multi-picture JPEG from phone cameras, opened by the JPEG decoder
        ("PNG", {}),
        ("WEBP", {"quality": 90}),
        ("GIF", {}),
        ("BMP", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
        ("HEIF", {"quality": 90}),
    ],
)
def test_accepted_formats_decode(fmt: str, kwargs: dict, other_decoders: list[str]):
    img = decode_image(encode(banded(48, 32), fmt, **kwargs), MAX, PIXELS)
    assert img.mode == "RGB" and img.size == (48, 32) and other_decoders == []


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


RAMP = np.arange(256).reshape(16, 16)  # every 8-bit level once


def levels(img: Image.Image) -> np.ndarray:
    """The grey levels of a decoded image (asserting that it is RGB and grey)."""
    arr = np.asarray(img, np.int16)
    assert img.mode == "RGB" and img.size == (16, 16)
    assert (arr == arr[..., :1]).all()
    return arr[..., 0]


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greys_are_rescaled_to_8_bit(fmt: str):
    # 257 v is 16-bit level v / 255 of full scale: the 8-bit ramp, not a ramp that saturates from 256 on
    assert Image.open(io.BytesIO(encode(Image.fromarray((RAMP * 257).astype(np.uint16)), fmt))).mode == "I;16"
    ramp = decode_image(encode(Image.fromarray((RAMP * 257).astype(np.uint16)), fmt), MAX, PIXELS)
    assert levels(ramp).tolist() == RAMP.tolist()
    mid = decode_image(encode(Image.fromarray(np.full((16, 16), 0x8000, np.uint16)), fmt), MAX, PIXELS)
    assert (levels(mid) == 128).all()  # half scale, rounded
    # a dark 16-bit image stays dark: levels up to 255 of 65535 are not 8-bit levels
    dark = decode_image(encode(Image.fromarray(RAMP.astype(np.uint16)), fmt), MAX, PIXELS)
    assert levels(dark).max() == 1


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


GREY_FILES = {  # mode, format, pixels, the 8-bit levels they stand for
    "L": ("PNG", RAMP.astype(np.uint8), RAMP),
    "LA": ("PNG", np.stack([RAMP * 0, RAMP], -1).astype(np.uint8), 255 - RAMP),  # black over white, by alpha
    "1": ("PNG", RAMP >= 100, np.where(RAMP >= 100, 255, 0)),
    "I": ("TIFF", (RAMP * 257).astype(np.int32), RAMP),  # a 32-bit TIFF holding 16-bit levels
    "F": ("TIFF", (RAMP / 255).astype(np.float32), RAMP),  # a float TIFF, 0-1
}


@pytest.mark.parametrize("mode", list(GREY_FILES))
def test_other_modes_keep_their_levels(mode: str):
    fmt, pixels, expected = GREY_FILES[mode]
    data = encode(Image.fromarray(pixels), fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    assert np.abs(levels(decode_image(data, MAX, PIXELS)) - expected).max() <= (1 if mode == "LA" else 0)


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


DRIP_INTERVAL = 0.2  # seconds between two bytes of a dripping server
DRIP_SECONDS = 20.0  # how long it drips at most (far past any deadline the tests use)


SLOW_CHUNKS = 100  # chunks of /slow-clocked: 10 s on its clock


class _Handler(http.server.BaseHTTPRequestHandler):
    """Test image server: paths pick the behaviour."""

    seen_hosts: list[str] = []
    seen_paths: list[str] = []
    clock: list[None] = []  # the clock of a fetch from /slow-clocked: one tick per chunk sent

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
        _Handler.seen_paths.append(self.path)
        port = self.server.server_address[1]
        if self.path in ("/img.jpg", "/fotos/caf%C3%A9%201.jpg?gr%C3%B6%C3%9Fe=gro%C3%9F&x=%2F"):
            self._send(200, jpeg(), {"Content-Type": "image/jpeg"})
        elif self.path == "/redirect-ok":
            self._send(302, headers={"Location": "/img.jpg"})
        elif self.path == "/redirect-metadata":
            self._send(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
        elif self.path == "/redirect-loop":
            self._send(302, headers={"Location": f"http://img.test:{port}/redirect-loop"})
        elif self.path == "/redirect-file":
            self._send(302, headers={"Location": "file:///etc/passwd"})
        elif self.path.startswith("/redirect-to?"):
            self._send(302, headers={"Location": unquote(self.path.partition("?")[2])})
        elif self.path == "/drip-headers":
            # A valid status line, then a header one byte at a time: each read gets a byte well within any socket
            # timeout, so only a deadline over the whole response ends it. Stops once the client has gone.
            try:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Drip: ")
                for _ in range(int(DRIP_SECONDS / DRIP_INTERVAL)):
                    self.wfile.write(b"a")
                    time.sleep(DRIP_INTERVAL)
                self.wfile.write(b"\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass
            self.close_connection = True
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
        elif self.path == "/slow-clocked":
            # The client's clock ticks as this server sends: time passes on it without real waiting.
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(SLOW_CHUNKS * 10))
            self.end_headers()
            try:
                for _ in range(SLOW_CHUNKS):
                    self.wfile.write(b"x" * 10)
                    self.wfile.flush()
                    _Handler.clock.append(None)
                    time.sleep(0.001)
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
    kwargs.setdefault("resolve", fake_dns({"img.test": ["127.0.0.1"]}))
    return fetch_url(
        f"http://img.test:{port}{path}",
        allow=loopback_ok,
        allowed_ports=frozenset({port}),
        **kwargs,
    )


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every address the fetcher opens a TCP connection to."""
    opened: list[str] = []
    real = socket.create_connection

    def spy(address, *args, **kwargs):
        opened.append(address[0])
        return real(address, *args, **kwargs)

    monkeypatch.setattr(uploads.socket, "create_connection", spy)
    return opened


def test_fetch_connects_to_the_checked_ip_with_the_original_host(image_server: int):
    _Handler.seen_hosts.clear()
    data = fetch(image_server, "/img.jpg")
    assert decode_image(data, MAX, PIXELS).size == (64, 48)
    assert _Handler.seen_hosts == [f"img.test:{image_server}"]


def test_fetch_sends_a_non_ascii_url_percent_encoded(image_server: int):
    _Handler.seen_paths.clear()
    data = fetch(image_server, "/fotos/café 1.jpg?größe=groß&x=%2F#top")  # typed, not copied: spaces and umlauts
    assert decode_image(data, MAX, PIXELS).size == (64, 48)
    assert _Handler.seen_paths == ["/fotos/caf%C3%A9%201.jpg?gr%C3%B6%C3%9Fe=gro%C3%9F&x=%2F"]  # % escapes kept


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://photos.example.com/a/b.jpg?X-Amz-Signature=abc#frag", "https://photos.example.com"),
        ("HTTPS://alice:s3cret@Photos.Example.com:8443/a.jpg", "https://photos.example.com:8443"),
        ("http://[2606:4700::1111]:8080/x?token=1", "http://[2606:4700::1111]:8080"),
        ("http://169.254.169.254/latest/meta-data/", "http://169.254.169.254"),
        ("file:///etc/passwd", "file:"),
        ("javascript:alert(document.cookie)", "javascript:"),
        ("http://example.com:99999/a", "(not a valid URL)"),
        ("just some words", "(not a URL)"),
    ],
)
def test_url_origin_keeps_scheme_and_host_only(url: str, origin: str):
    assert url_origin(url) == origin


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
    """On the fetch's clock each chunk of the body takes a tenth of a second, so the body takes 10 s against a deadline
    of 1 s: the fetch is refused, however fast or busy the machine (in real time the body takes about 0.1 s, so a
    fetch without the cap returns it)."""
    _Handler.clock.clear()
    with pytest.raises(UploadError, match="took too long to answer"):
        fetch(image_server, "/slow-clocked", timeout=1.0, clock=lambda: 0.1 * len(_Handler.clock))


# Generous margin over the deadline: the behaviour under test is "ends at the deadline" instead of "ends when the
# server stops" (DRIP_SECONDS), and this 2-core machine may be busy with other test runs.
DEADLINE = 1.5
MARGIN = 4.0


def test_header_dripping_server_is_cut_at_the_deadline(image_server: int):
    start = time.monotonic()
    with pytest.raises(UploadError, match="took too long to answer"):
        fetch(image_server, "/drip-headers", timeout=DEADLINE)
    assert time.monotonic() - start < DEADLINE + MARGIN


def test_slow_name_lookup_counts_against_the_deadline(image_server: int, connections: list[str]):
    def slow_dns(host: str, port: int) -> list[str]:
        time.sleep(DEADLINE + MARGIN + 1)  # then a valid answer: only the deadline can stop the fetch
        return ["127.0.0.1"]

    start = time.monotonic()
    with pytest.raises(UploadError, match="took too long to answer"):
        fetch(image_server, "/img.jpg", timeout=DEADLINE, resolve=slow_dns)
    assert time.monotonic() - start < DEADLINE + MARGIN
    assert connections == []


@pytest.fixture
def tls_dripper() -> Iterator[int]:
    """A TCP server that answers a TLS ClientHello with a handshake record one byte at a time; yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(DRIP_SECONDS)
    stop = threading.Event()

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            # record header: handshake, TLS 1.2, 16 KiB long; then its body, byte by byte
            for byte in b"\x16\x03\x03\x40\x00" + b"\x02" * 100:
                if stop.wait(DRIP_INTERVAL):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()
    thread.join(5)


def test_tls_handshake_counts_against_the_deadline(tls_dripper: int):
    start = time.monotonic()
    with pytest.raises(UploadError, match="took too long to answer"):
        fetch_url(
            f"https://img.test:{tls_dripper}/a.jpg",
            MAX,
            timeout=DEADLINE,
            resolve=fake_dns({"img.test": ["127.0.0.1"]}),
            allow=loopback_ok,
            allowed_ports=frozenset({tls_dripper}),
            ssl_context=ssl.create_default_context(),
        )
    assert time.monotonic() - start < DEADLINE + MARGIN


METADATA_URL = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"


@pytest.mark.parametrize(
    "location",
    [
        METADATA_URL,
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "http://2852039166/latest/meta-data/",  # 169.254.169.254 as one decimal number
        "http://0xa9.0xfe.0xa9.0xfe/latest/meta-data/",
        "http://metadata.test/latest/meta-data/",  # a name that resolves to it
        "https://metadata.test/latest/meta-data/",
    ],
)
def test_redirect_to_the_metadata_service_is_refused(image_server: int, connections: list[str], location: str):
    table = {"img.test": ["127.0.0.1"], "metadata.test": ["169.254.169.254"]}

    def dns(host: str, port: int) -> list[str]:
        return table[host] if host in table else resolve_host(host, port)  # numeric spellings: the real resolver

    with pytest.raises(UploadError) as err:
        fetch(image_server, "/redirect-to?" + quote(location, safe=""), resolve=dns)
    message = str(err.value)
    assert "redirected to" in message and "private or reserved" in message and "Nothing was fetched" in message
    assert f"redirected to {url_origin(location)}," in message and "meta-data" not in message  # logged: no path
    assert connections == ["127.0.0.1"]  # the allowed first hop only


def test_redirect_back_to_a_name_that_now_resolves_to_the_metadata_service(image_server: int, connections: list):
    answers = iter([["127.0.0.1"], ["169.254.169.254"]])  # DNS rebinding between two hops

    with pytest.raises(UploadError, match="redirected to .* private or reserved"):
        fetch(image_server, "/redirect-to?" + quote("/img.jpg", safe=""), resolve=lambda host, port: next(answers))
    assert connections == ["127.0.0.1"]


def test_fetch_refuses_loopback_under_the_default_policy(image_server: int):
    with pytest.raises(UploadError, match="private or reserved"):
        fetch_url(f"http://127.0.0.1:{image_server}/img.jpg", MAX, allowed_ports=frozenset({image_server}))
