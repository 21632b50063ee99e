"""User-supplied images, imported by each dashboard kernel: safe decoding of uploaded bytes and guarded fetching of
image URLs."""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lib.files import MIB
from lib.transforms import to_rgb

try:
    import pillow_heif
except ImportError:  # a declared dependency; an install that predates it refuses HEIC with a hint instead
    pillow_heif = None
else:
    # Only the primary image: thumbnails, depth maps and auxiliary images are never decoded.
    pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)

# The only Pillow decoders user bytes ever reach (Image.open(formats=...)). Pillow's JPEG opener also reads MPO,
# the multi-picture JPEG some phones write. Everything else (PSD, EPS through Ghostscript, FITS, ICO ...) is refused
# before any of its parsers runs.
DECODE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF") + (("HEIF",) if pillow_heif else ())
ACCEPTED = ("JPEG", "PNG", "WebP", "GIF", "BMP", "TIFF") + (("HEIC/HEIF",) if pillow_heif else ())
SUPPORTED = ", ".join(ACCEPTED[:-1]) + " or " + ACCEPTED[-1]
# Formats recognised by their first bytes only to name them in the refusal (none of them is ever decoded).
REFUSED_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"8BPS", 0, "Photoshop (PSD)"),
    (b"%!PS", 0, "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", 0, "PostScript/EPS"),
    (b"SIMPLE  =", 0, "FITS"),
    (b"\x00\x00\x01\x00", 0, "Windows icon (ICO)"),
    (b"\x00\x00\x02\x00", 0, "Windows cursor (CUR)"),
    (b"icns", 0, "Apple icon (ICNS)"),
    (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"),
    (b"\xffO\xffQ", 0, "JPEG 2000"),
    (b"ftypavif", 4, "AVIF"),
    (b"ftypavis", 4, "AVIF"),
    (b"qoif", 0, "QOI"),
    (b"DDS ", 0, "DirectDraw (DDS)"),
    (b"gimp xcf", 0, "GIMP (XCF)"),
)
TOO_SLOW = "The image server took too long to answer."
REDIRECT_CODES = (301, 302, 303, 307, 308)
DEFAULT_PORTS = {"http": 80, "https": 443}
ALLOWED_PORTS = frozenset({80, 443, 8080, 8443})
NAT64 = ipaddress.ip_network("64:ff9b::/96")
USER_AGENT = "har-vit-dashboard/1.0 (+image fetch)"
# Characters a request target keeps as they are: RFC 3986's reserved ones and '%' (a URL that is already encoded
# stays so). Everything else (non-ASCII, spaces, control characters) is percent-encoded as UTF-8.
TARGET_SAFE = "!#$%&'()*+,/:;=?@[]~"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

ImageFile.LOAD_TRUNCATED_IMAGES = False


class UploadError(ValueError):
    """A user-facing reason why an upload or URL cannot be classified."""


def _mib(n: int | float) -> str:
    """Human size in MiB with one decimal ('20.0 MiB')."""
    return f"{n / MIB:.1f} MiB"


def _heif_like(data: bytes) -> bool:
    """True for ISO-BMFF HEIC/HEIF image containers (phone photos)."""
    return data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1")


def refused_format(data: bytes) -> str | None:
    """The name of a known image format outside the accepted ones, from its first bytes (None if unknown)."""
    for magic, offset, name in REFUSED_MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return name
    return None


def not_accepted_message(data: bytes) -> str:
    """Why bytes that no accepted decoder recognises are refused, naming the accepted formats."""
    if _heif_like(data):
        if pillow_heif is None:
            return (
                "HEIC/HEIF photos are not supported here: export the photo as JPEG "
                "(or set the camera to 'Most Compatible')."
            )
        return "The HEIC/HEIF photo is damaged or truncated and cannot be decoded."
    name = refused_format(data)
    if name:
        return f"This is a {name} file, whatever its name says; only {SUPPORTED} images are accepted."
    return f"This file is not an image we can read. Please upload a {SUPPORTED} file."


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
            img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
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
        raise UploadError(not_accepted_message(data)) from exc
    except (
        OSError,
        SyntaxError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        ZeroDivisionError,
        RuntimeError,  # what pillow-heif raises for libheif errors at decode (NotImplementedError is one too)
    ) as exc:
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


class _Deadline:
    """One time budget for a whole fetch: DNS, connect, TLS, headers and body, over every redirect hop.

    A socket timeout bounds one read only, so a server that drips a byte every few seconds never trips it. At the
    deadline a timer shuts the open socket down instead, which wakes a read blocked anywhere in http.client or ssl.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        """Start the clock; clock() gives the time in seconds (the timer that cuts the socket runs on real time)."""
        self.clock = clock
        self.end = clock() + seconds
        self.expired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(seconds, 0.0), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        """Seconds left; UploadError once there are none."""
        left = self.end - self.clock()
        if self.expired or left <= 0:
            raise UploadError(TOO_SLOW)
        return left

    def watch(self, sock: socket.socket | None) -> None:
        """Shut sock down at the deadline (None: forget the socket, before it gets closed)."""
        with self._lock:
            self._sock = sock
            if sock is not None and self.expired:
                self._shutdown(sock)

    def cancel(self) -> None:
        """Stop the clock (the fetch is over)."""
        self._timer.cancel()
        self.watch(None)

    def _expire(self) -> None:
        """Timer callback: mark the fetch as too slow and cut its socket."""
        with self._lock:
            self.expired = True
            if self._sock is not None:
                self._shutdown(self._sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        """Shut both directions of the descriptor down; a blocked recv returns at once."""
        try:
            # The plain socket method, also for an SSLSocket: its own shutdown() drops the TLS state that a read
            # blocked in another thread is still using.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:  # already closed or never connected
            pass


def _resolve_within(resolve: Resolver, host: str, port: int, seconds: float) -> list[str]:
    """resolve(host, port) in a helper thread, given up after seconds: getaddrinfo itself has no timeout."""
    answer: dict[str, Any] = {}

    def run() -> None:
        """Resolve and keep the answer or the error."""
        try:
            answer["addresses"] = resolve(host, port)
        except Exception as exc:
            answer["error"] = exc

    worker = threading.Thread(target=run, name="har-url-dns", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():  # the lookup ends at the resolver's own timeout; its answer is dropped
        raise UploadError(TOO_SLOW)
    if "error" in answer:
        raise answer["error"]
    return answer["addresses"]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP connection to a pre-checked IP, with the original host name in the Host header, under a deadline."""

    def __init__(self, host: str, ip: str, port: int, deadline: _Deadline) -> None:
        """Remember the checked IP and the fetch's deadline."""
        super().__init__(host, port, timeout=deadline.remaining())
        self._ip = ip
        self._deadline = deadline

    def _open_socket(self) -> socket.socket:
        """TCP to the checked IP (never re-resolving the name) within the time left; the deadline watches it."""
        sock = socket.create_connection((self._ip, self.port), self._deadline.remaining())
        self._deadline.watch(sock)
        return sock

    def connect(self) -> None:
        """Connect to the checked IP."""
        self.sock = self._open_socket()


class _PinnedHTTPSConnection(_PinnedHTTPConnection, http.client.HTTPSConnection):
    """HTTPS connection to a pre-checked IP; the certificate is verified against the host name."""

    def __init__(self, host: str, ip: str, port: int, deadline: _Deadline, context: ssl.SSLContext) -> None:
        """Remember the checked IP, the deadline and the TLS context."""
        http.client.HTTPSConnection.__init__(self, host, port, timeout=deadline.remaining(), context=context)
        self._ip = ip
        self._deadline = deadline
        self._ctx = context

    def connect(self) -> None:
        """Connect to the checked IP, then TLS with SNI and hostname check for the original name."""
        sock = self._open_socket()
        tls = self._ctx.wrap_socket(sock, server_hostname=self.host, do_handshake_on_connect=False)
        self.sock = tls
        self._deadline.watch(tls)  # wrap_socket moved the descriptor into tls: the handshake is watched too
        tls.do_handshake()


def check_url(
    url: str,
    resolve: Resolver = resolve_host,
    allow: Callable[[IPAddress], bool] = is_public_address,
    allowed_ports: frozenset[int] = ALLOWED_PORTS,
    lookup_timeout: float | None = None,
) -> tuple[str, str, int, str, str]:
    """Validate a URL and resolve it: (scheme, host, port, checked ip, path+query); raise UploadError if refused.

    lookup_timeout bounds the name lookup (seconds); None waits as long as the resolver does."""
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
            if lookup_timeout is None:
                addresses = resolve(host, port)
            else:
                addresses = _resolve_within(resolve, host, port, lookup_timeout)
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
    target = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe=TARGET_SAFE)
    return scheme, host, port, addresses[0], target


def url_origin(url: str) -> str:
    """scheme://host[:port] of a URL, for logs and messages. Its user name, password, path, query and fragment can
    carry secrets (pre-signed links, access tokens), so nothing but the origin is ever logged or echoed."""
    try:
        parts = urlsplit(str(url).strip())
        host, port = parts.hostname, parts.port
    except ValueError:
        return "(not a valid URL)"
    if not parts.scheme:
        return "(not a URL)"
    if not host:
        return f"{parts.scheme.lower()}:"
    host = f"[{host}]" if ":" in host else host[:253]
    return f"{parts.scheme.lower()}://{host}" + (f":{port}" if port is not None else "")


def fetch_url(
    url: str,
    max_bytes: int,
    timeout: float = 10.0,
    max_redirects: int = 3,
    resolve: Resolver = resolve_host,
    allow: Callable[[IPAddress], bool] = is_public_address,
    allowed_ports: frozenset[int] = ALLOWED_PORTS,
    ssl_context: ssl.SSLContext | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> bytes:
    """Download an image URL safely: checked IPs only, redirects re-checked and capped, size capped, and one
    deadline of timeout seconds over the whole fetch (DNS, connect, TLS, headers, body, every hop), measured on
    clock. Messages name the origin (scheme and host) of a URL only."""
    deadline = _Deadline(timeout, clock)
    context = ssl_context or ssl.create_default_context()
    try:
        for hop in range(max_redirects + 1):
            try:
                scheme, host, port, ip, target = check_url(
                    url, resolve, allow, allowed_ports, lookup_timeout=deadline.remaining()
                )
            except UploadError as exc:
                if hop == 0 or str(exc) == TOO_SLOW:
                    raise
                # Every hop is checked before anything connects to it: a redirect to the metadata service
                # (169.254.169.254) or any other refused address ends here.
                raise UploadError(
                    f"The image URL redirected to {url_origin(url)}, which is refused: {exc} "
                    "Nothing was fetched from it."
                ) from None
            conn: http.client.HTTPConnection = (
                _PinnedHTTPSConnection(host, ip, port, deadline, context)
                if scheme == "https"
                else _PinnedHTTPConnection(host, ip, port, deadline)
            )
            try:
                conn.request(
                    "GET",
                    target,
                    headers={"User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"},
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
            except (OSError, http.client.HTTPException) as exc:
                # After the deadline cut the socket, any error (EOF, reset, bad status line) means "too slow".
                if deadline.expired or isinstance(exc, TimeoutError):
                    raise UploadError(TOO_SLOW) from exc
                if isinstance(exc, ssl.SSLError):
                    raise UploadError(f"The TLS certificate of {host} could not be verified.") from exc
                raise UploadError(f"Could not download the image from {host}.") from exc
            finally:
                deadline.watch(None)
                conn.close()
        raise UploadError(f"Too many redirects (more than {max_redirects}).")
    finally:
        deadline.cancel()


def _read_capped(resp: http.client.HTTPResponse, max_bytes: int, deadline: _Deadline) -> bytes:
    """Read a response body in chunks, stopping past max_bytes or the deadline."""
    buf = bytearray()
    while True:
        deadline.remaining()
        chunk = resp.read1(64 * 1024)
        if not chunk:
            break
        buf += chunk
        if len(buf) > max_bytes:
            raise UploadError(f"The image is larger than the limit of {_mib(max_bytes)}.")
    deadline.remaining()  # a body without a length ends at EOF, and the deadline's cut is an EOF too
    check_size(len(buf), max_bytes)
    return bytes(buf)
