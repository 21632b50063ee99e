"""User-supplied images: safe decoding of uploaded bytes and guarded fetching of image URLs."""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import ssl
import time
import warnings
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lib.transforms import to_rgb

MIB = 1024 * 1024
SUPPORTED = "JPEG, PNG, GIF, WebP, BMP or TIFF"
REDIRECT_CODES = (301, 302, 303, 307, 308)
DEFAULT_PORTS = {"http": 80, "https": 443}
ALLOWED_PORTS = frozenset({80, 443, 8080, 8443})
NAT64 = ipaddress.ip_network("64:ff9b::/96")
USER_AGENT = "har-vit-dashboard/1.0 (+image fetch)"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

ImageFile.LOAD_TRUNCATED_IMAGES = False


class UploadError(ValueError):
    """A user-facing reason why an upload or URL cannot be classified."""


def _mib(n: int | float) -> str:
    """Human size in MiB with one decimal ('20.0 MiB')."""
    return f"{n / MIB:.1f} MiB"


def _heif_like(data: bytes) -> bool:
    """True for ISO-BMFF image containers Pillow cannot open here (HEIC/HEIF from phones)."""
    return data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1")


def check_size(n_bytes: int, max_bytes: int) -> None:
    """Raise UploadError for an empty file or one over the byte cap."""
    if n_bytes <= 0:
        raise UploadError("The file is empty.")
    if n_bytes > max_bytes:
        raise UploadError(f"The file is {_mib(n_bytes)}; the limit is {_mib(max_bytes)}. Please send a smaller image.")


def _draft(img: Image.Image, max_side: int | None) -> None:
    """Let a JPEG decode at a reduced scale (1/2, 1/4, 1/8) when it is far larger than max_side."""
    if max_side and max(img.size) > max_side and img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK", "YCbCr"):
        img.draft(img.mode, (max_side, max_side))


def _reduce(img: Image.Image, max_side: int | None) -> Image.Image:
    """Integer box-reduce a decoded image at least twice too large, before any mode conversion copies it."""
    if not max_side or max(img.size) < 2 * max_side:
        return img
    try:
        return img.reduce(max(img.size) // max_side)
    except (ValueError, NotImplementedError):  # modes reduce() does not handle (P, 1, I;16 ...)
        return img


def decode_image(data: bytes, max_bytes: int, max_pixels: int, max_side: int | None = None) -> Image.Image:
    """Decode uploaded bytes into an RGB image (first frame, EXIF orientation applied) or raise UploadError."""
    check_size(len(data), max_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w <= 0 or h <= 0:
                raise UploadError("The image has no pixels.")
            if w * h > max_pixels:
                raise UploadError(
                    f"The image is {w} x {h} = {w * h / 1e6:.1f} megapixels; "
                    f"the limit is {max_pixels / 1e6:.1f} megapixels."
                )
            animated = bool(getattr(img, "is_animated", False))
            img.seek(0)
            _draft(img, max_side)
            img.load()
            img = _reduce(img, max_side)
            img = ImageOps.exif_transpose(img) or img
            rgb = to_rgb(img)
            if max_side and max(rgb.size) > max_side:
                rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    except UploadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UploadError(f"The image has too many pixels (limit {max_pixels / 1e6:.1f} megapixels).") from exc
    except UnidentifiedImageError as exc:
        if _heif_like(data):
            raise UploadError(
                "HEIC/HEIF photos are not supported: export the photo as JPEG (or set the camera to 'Most Compatible')."
            ) from exc
        raise UploadError(f"This file is not an image we can read. Please upload a {SUPPORTED} file.") from exc
    except (OSError, SyntaxError, EOFError, ValueError, TypeError, IndexError, KeyError, ZeroDivisionError) as exc:
        raise UploadError("The image file is damaged or truncated and cannot be decoded.") from exc
    except MemoryError as exc:
        raise UploadError("The image is too large to decode.") from exc
    rgb.info["animated"] = animated
    return rgb


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses carried inside an IPv6 one (mapped, 6to4, Teredo, NAT64)."""
    found = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo:
        found.extend(ip.teredo)
    if ip in NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def is_public_address(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses (no loopback, private, link-local, multicast, reserved)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return False
        if any(not is_public_address(v4) for v4 in _embedded_ipv4(ip)):
            return False
    return ip.is_global and not (
        ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_unspecified
    )


def resolve_host(host: str, port: int) -> list[str]:
    """All addresses a host name resolves to (TCP), in resolver order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP connection to a pre-checked IP, with the original host name in the Host header."""

    def __init__(self, host: str, ip: str, port: int, timeout: float) -> None:
        """Remember the checked IP next to the host name."""
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self) -> None:
        """Connect to the checked IP, never re-resolving the name."""
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS connection to a pre-checked IP; the certificate is verified against the host name."""

    def __init__(self, host: str, ip: str, port: int, timeout: float, context: ssl.SSLContext) -> None:
        """Remember the checked IP and the TLS context."""
        super().__init__(host, port, timeout=timeout, context=context)
        self._ip = ip
        self._ctx = context

    def connect(self) -> None:
        """Connect to the checked IP, then TLS with SNI and hostname check for the original name."""
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self.host)


def check_url(
    url: str,
    resolve: Resolver = resolve_host,
    allow: Callable[[IPAddress], bool] = is_public_address,
    allowed_ports: frozenset[int] = ALLOWED_PORTS,
) -> tuple[str, str, int, str, str]:
    """Validate a URL and resolve it: (scheme, host, port, checked ip, path+query); raise UploadError if refused."""
    url = url.strip()
    if len(url) > 2048:
        raise UploadError("That URL is too long.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UploadError("That does not look like a valid URL.") from exc
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise UploadError("Only http:// and https:// image URLs are accepted.")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UploadError("The URL has no host name.")
    if parts.username or parts.password:
        raise UploadError("URLs with a user name or password are not accepted.")
    port = port or DEFAULT_PORTS[scheme]
    try:
        literal = ipaddress.ip_address(host)
        addresses = [str(literal)]
    except ValueError:
        try:
            addresses = resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise UploadError(f"The host name {host!r} could not be resolved.") from exc
    if not addresses:
        raise UploadError(f"The host name {host!r} could not be resolved.")
    for addr in addresses:
        if not allow(ipaddress.ip_address(addr)):
            raise UploadError("That address points to a private or reserved network and is not allowed.")
    if port not in allowed_ports:
        raise UploadError(
            f"Port {port} is not allowed; use a normal web address "
            f"(ports {', '.join(map(str, sorted(allowed_ports)))})."
        )
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, host, port, addresses[0], target


def fetch_url(
    url: str,
    max_bytes: int,
    timeout: float = 10.0,
    max_redirects: int = 3,
    resolve: Resolver = resolve_host,
    allow: Callable[[IPAddress], bool] = is_public_address,
    allowed_ports: frozenset[int] = ALLOWED_PORTS,
    ssl_context: ssl.SSLContext | None = None,
) -> bytes:
    """Download an image URL safely: checked IPs only, redirects re-checked and capped, size and time capped."""
    deadline = time.monotonic() + timeout
    context = ssl_context or ssl.create_default_context()
    for _hop in range(max_redirects + 1):
        scheme, host, port, ip, target = check_url(url, resolve, allow, allowed_ports)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UploadError("The image server took too long to answer.")
        conn: http.client.HTTPConnection = (
            _PinnedHTTPSConnection(host, ip, port, remaining, context)
            if scheme == "https"
            else _PinnedHTTPConnection(host, ip, port, remaining)
        )
        try:
            conn.request(
                "GET", target, headers={"User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"}
            )
            resp = conn.getresponse()
            if resp.status in REDIRECT_CODES:
                location = resp.getheader("Location")
                if not location:
                    raise UploadError(f"The server answered a redirect ({resp.status}) without a target.")
                url = urljoin(url, location)
                continue
            if resp.status != 200:
                raise UploadError(f"The server answered HTTP {resp.status} {resp.reason}.")
            ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if ctype in ("text/html", "application/xhtml+xml"):
                raise UploadError(
                    "That URL is a web page, not an image: copy the image's own address (right-click the image)."
                )
            length = resp.getheader("Content-Length")
            if length and length.isdigit():
                check_size(int(length), max_bytes)
            return _read_capped(resp, max_bytes, deadline)
        except UploadError:
            raise
        except ssl.SSLError as exc:
            raise UploadError(f"The TLS certificate of {host} could not be verified.") from exc
        except TimeoutError as exc:
            raise UploadError("The image server took too long to answer.") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise UploadError(f"Could not download the image from {host}.") from exc
        finally:
            conn.close()
    raise UploadError(f"Too many redirects (more than {max_redirects}).")


def _read_capped(resp: http.client.HTTPResponse, max_bytes: int, deadline: float) -> bytes:
    """Read a response body in chunks, stopping past max_bytes or the deadline."""
    buf = bytearray()
    while True:
        if time.monotonic() > deadline:
            raise UploadError("The image server took too long to answer.")
        chunk = resp.read1(64 * 1024)
        if not chunk:
            break
        buf += chunk
        if len(buf) > max_bytes:
            raise UploadError(f"The image is larger than the limit of {_mib(max_bytes)}.")
    check_size(len(buf), max_bytes)
    return bytes(buf)
