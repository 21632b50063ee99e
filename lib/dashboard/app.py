"""The dashboard app, imported by each Voila kernel (one per visitor): load the served model, classify uploaded
photos and pasted URLs, render the results. The server process imports lib/dashboard/server.py instead."""

from __future__ import annotations

import base64
import contextlib
import functools
import html
import io
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from lib.dashboard.settings import dashboard_params, env_int, upload_limits
from lib.dashboard.uploads import SUPPORTED, UploadError, decode_image, fetch_url, url_origin
from lib.files import MIB, read_json
from lib.metrics import SUMMARY_METRICS
from lib.params import DEFAULT_PARAMS, DashboardParams, ParamsError, load_params
from lib.registry.storage import LATEST, MANIFEST, LocalStorage, RegistryError, open_storage
from lib.transforms import RESAMPLE, ImageSpec, load_spec, resize_for_crop

log = logging.getLogger("har.dashboard")

MAX_FILES_PER_UPLOAD = 8
DECODE_SIDE = 1024  # photos are shrunk to this longer side right after decoding
THUMB_SIDE = 320
OVERLAY_SIDE = 224
KEEP_RESULTS = 24
OCCLUSION_GRID = 8
# Images per model run (occlusion maps run grid^2 + 1): ONNX Runtime's memory arena keeps the buffers of its largest
# run for the kernel's life. With ViT-B/16 int8 a kernel held 459 MiB after an occlusion map in runs of 16, 292 in 4.
PREDICT_BATCH = 4
# The file chooser's filter: image/* alone hides .heic files where the system has no MIME type for them.
UPLOAD_ACCEPT = "image/*,.heic,.heif"
URL_TIMEOUT_S = 10.0
DEMO_SOURCE = "embedded"  # data.source of the generated stick-figure images (lib/demo/synthetic.py)
REAL_PROFILE = "params/har_vit.yaml"
DEMO_CARD_NOTE = "Demo model, trained on generated stick figures only: this answer says nothing about a real photo."


# --------------------------------------------------------------------------- settings


@functools.cache
def server_log_stream() -> Any:
    """A text stream to the kernel's real stderr (the service log), never to the page's iopub channel."""
    fd = getattr(sys.stderr, "_original_stdstream_copy", None)
    if fd is not None:
        return io.TextIOWrapper(io.FileIO(os.dup(fd), "w"), line_buffering=True)
    return sys.__stderr__


def setup_logging() -> None:
    """Send this module's log records to the service log once per process."""
    if any(getattr(h, "_har_dashboard", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(server_log_stream())
    handler.setFormatter(logging.Formatter("[dashboard %(process)d] %(levelname)s %(message)s"))
    handler._har_dashboard = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


# --------------------------------------------------------------------------- model


@dataclass
class ModelBundle:
    """A loaded predictor with what the page shows about it."""

    predictor: Any
    spec: ImageSpec
    root: Path
    name: str
    version: str
    created: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    served: dict[str, Any] = field(default_factory=dict)  # metrics.json["served"]: what this predictor achieves
    patch_grid: int = OCCLUSION_GRID
    data_source: str | None = None  # what the version was trained on (see training_data_source)

    @property
    def is_demo(self) -> bool:
        """True when the model was trained on the embedded generated images, not on photos."""
        return self.data_source == DEMO_SOURCE


@dataclass
class Prediction:
    """Top-k (label, probability) in descending order and the time it took."""

    top: list[tuple[str, float]]
    ms: float


def model_folder(p: DashboardParams, environ: Mapping[str, str] | None = None) -> Path:
    """The model version folder: HAR_MODEL_DIR when set (pre-pulled), else pulled from the registry (cached)."""
    environ = os.environ if environ is None else environ
    if environ.get("HAR_MODEL_DIR"):
        # Resolved once: the bootstrap swaps this link to roll a new version, and a kernel starting during the swap
        # must read every file from one version.
        root = Path(environ["HAR_MODEL_DIR"]).expanduser().resolve()
        if not (root / "model").is_dir():
            raise FileNotFoundError(f"HAR_MODEL_DIR={root} holds no model/ folder")
        return root
    from lib.registry.pull import pull

    return pull(p.registry, p.model_name, p.version)


def training_data_source(metrics: Mapping[str, Any], params_tree: Any) -> str | None:
    """The training data source of a version: metrics.json's data.source, else params.yaml's data.source (the
    pipeline writes its params resolved, so the key is there); None when the version records neither."""
    for tree in (metrics, params_tree):
        data = tree.get("data") if isinstance(tree, Mapping) else None
        if isinstance(data, Mapping) and data.get("source"):
            return str(data["source"])
    return None


def read_params_tree(path: Path) -> Any:
    """A version's params.yaml as plain data (None if it is missing or unreadable)."""
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def load_bundle(p: DashboardParams, environ: Mapping[str, str] | None = None) -> ModelBundle:
    """Pull (or find) the model version and load its predictor."""
    from lib.predict import load_predictor

    environ = os.environ if environ is None else environ
    root = model_folder(p, environ)
    threads = env_int(environ, "HAR_THREADS", 0, 0) or None
    predictor = load_predictor(root, backend=p.backend, device=p.device, threads=threads)
    predictor.batch_size = PREDICT_BATCH
    manifest = read_json(root / "manifest.json", default={})
    metrics = read_json(root / "metrics.json", default={})
    config = read_json(root / "model" / "config.json", default={})
    image_size, patch = int(config.get("image_size") or 0), int(config.get("patch_size") or 0)
    grid = min(OCCLUSION_GRID, image_size // patch) if image_size and patch else OCCLUSION_GRID
    summary = {k: float(metrics[k]) for k in SUMMARY_METRICS if isinstance(metrics.get(k), (int, float))}
    return ModelBundle(
        predictor=predictor,
        spec=load_spec(root / "model"),
        root=root,
        name=str(manifest.get("model_name") or p.model_name),
        version=str(manifest.get("version") or root.name),
        created=manifest.get("created"),
        metrics=summary,
        served=metrics["served"] if isinstance(metrics.get("served"), dict) else {},
        patch_grid=max(2, grid),
        data_source=training_data_source(metrics, read_params_tree(root / "params.yaml")),
    )


def classify(bundle: ModelBundle, img: Image.Image, k: int) -> Prediction:
    """Top-k calibrated probabilities for one image, timed (preprocessing included)."""
    start = time.perf_counter()
    top = bundle.predictor.top_k(img, k)
    ms = (time.perf_counter() - start) * 1000.0
    return Prediction(top=[(str(label), float(prob)) for label, prob in top], ms=ms)


def model_input_view(img: Image.Image, spec: ImageSpec) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The resized image the eval transform crops from, and the crop box (what the model sees)."""
    return resize_for_crop(img, spec)


def occlusion_map(
    bundle: ModelBundle, img: Image.Image, label: str, grid: int | None = None
) -> tuple[np.ndarray, Image.Image]:
    """Occlusion sensitivity: drop in the label's probability when each grid cell is greyed out, scaled to [0, 1]."""
    grid = grid or bundle.patch_grid
    spec = bundle.spec
    resized, (left, top, right, bottom) = model_input_view(img, spec)
    fill = tuple(int(round(m * 255)) for m in spec.mean)
    cell = spec.size / grid
    batch = [resized]
    for gy in range(grid):
        for gx in range(grid):
            occluded = resized.copy()
            box = (
                left + round(gx * cell),
                top + round(gy * cell),
                left + round((gx + 1) * cell),
                top + round((gy + 1) * cell),
            )
            occluded.paste(fill, box)
            batch.append(occluded)
    index = list(bundle.predictor.labels).index(label)
    probs = np.asarray(bundle.predictor.predict_proba(batch))[:, index]
    drop = np.clip(probs[0] - probs[1:], 0.0, None).reshape(grid, grid)
    peak = float(drop.max())
    return (drop / peak if peak > 0 else drop), resized.crop((left, top, right, bottom))


def overlay_heatmap(crop: Image.Image, heat: np.ndarray, side: int = OVERLAY_SIDE) -> Image.Image:
    """Blend a [0, 1] heat grid over the model's view in red (stronger red = bigger drop when hidden)."""
    base = np.asarray(crop.convert("RGB").resize((side, side), RESAMPLE), dtype=np.float32)
    mask = Image.fromarray((np.clip(heat, 0, 1) * 255).astype(np.uint8), "L").resize(
        (side, side), Image.Resampling.BILINEAR
    )
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0 * 0.65
    grey = base.mean(axis=2, keepdims=True) * 0.6 + base * 0.4
    red = np.array([230.0, 30.0, 30.0], dtype=np.float32)
    out = grey * (1 - alpha) + red * alpha
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------- HTML


def data_url(img: Image.Image, side: int = THUMB_SIDE) -> str:
    """A JPEG data: URL of the image shrunk to side pixels at most."""
    thumb = img.convert("RGB")
    if max(thumb.size) > side:
        thumb = thumb.copy()
        thumb.thumbnail((side, side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _e(value: Any) -> str:
    """HTML-escape any value (quotes included)."""
    return html.escape(str(value), quote=True)


def render_bars(top: list[tuple[str, float]]) -> str:
    """Top-k as a horizontal bar chart; each row carries data-label and data-prob."""
    rows = []
    for rank, (label, prob) in enumerate(top, 1):
        pct = max(0.0, min(100.0, prob * 100.0))
        rows.append(
            f'<div class="har-pred" data-rank="{rank}" data-label="{_e(label)}" data-prob="{prob:.6f}">'
            f'<span class="har-label">{_e(label)}</span>'
            f'<span class="har-bar"><span class="har-fill" style="width:{pct:.1f}%"></span></span>'
            f'<span class="har-prob">{pct:.1f}%</span></div>'
        )
    return f'<div class="har-topk">{"".join(rows)}</div>'


def render_result(
    name: str,
    img: Image.Image,
    pred: Prediction,
    low_confidence: float,
    bundle: ModelBundle,
    overlay: Image.Image | None = None,
    overlay_ms: float | None = None,
    notes: list[str] | None = None,
) -> str:
    """One result card: the photo, the top-k bars, timing, model version, notices."""
    top_label, top_prob = pred.top[0] if pred.top else ("", 0.0)
    low = top_prob < low_confidence
    parts = [
        f'<div class="har-result" data-name="{_e(name)}" data-top-label="{_e(top_label)}" '
        f'data-top-prob="{top_prob:.6f}" data-ms="{pred.ms:.2f}" data-low-confidence="{str(low).lower()}">',
        f'<div class="har-images"><figure><img class="har-image" alt="{_e(name)}" src="{data_url(img)}">'
        f"<figcaption>{_e(name)}</figcaption></figure>",
    ]
    if overlay is not None:
        parts.append(
            f'<figure><img class="har-saliency" alt="occlusion map" src="{data_url(overlay, OVERLAY_SIDE)}">'
            "<figcaption>the model's view (its resize and crop); red: hiding this area lowers the top class most"
            "</figcaption></figure>"
        )
    parts.append('</div><div class="har-body">')
    parts.append(f'<div class="har-headline">{_e(top_label)} <span>{top_prob * 100:.1f}%</span></div>')
    parts.append(render_bars(pred.top))
    if low:
        parts.append(
            f'<div class="har-low-confidence">Low confidence: the top class is below {low_confidence * 100:.0f}%. '
            "The photo may show none of the known actions, several people doing different things, "
            "or too little of the person.</div>"
        )
    for note in notes or []:
        parts.append(f'<div class="har-note">{_e(note)}</div>')
    timing = f"predicted in {pred.ms:.0f} ms"
    if overlay_ms is not None:
        timing += f" · occlusion map {overlay_ms:.0f} ms"
    parts.append(
        f'<div class="har-meta"><span class="har-time">{_e(timing)}</span> · '
        f'<span class="har-version">{_e(bundle.name)} {_e(bundle.version)}</span></div>'
    )
    parts.append("</div></div>")
    return "".join(parts)


def render_error(name: str, message: str) -> str:
    """An error card naming the file (or URL) and the user-facing reason."""
    return f'<div class="har-error" data-name="{_e(name)}"><b>{_e(name)}</b>: {_e(message)}</div>'


def short_time(iso: str) -> str:
    """'2025-01-02T03:04:05.678+00:00' as '2025-01-02 03:04 UTC' (the input unchanged if it is not ISO 8601)."""
    from datetime import UTC, datetime

    try:
        stamp = datetime.fromisoformat(str(iso))
    except ValueError:
        return str(iso)
    if stamp.tzinfo is not None:
        stamp = stamp.astimezone(UTC)
    return f"{stamp:%Y-%m-%d %H:%M} UTC"


def render_demo_warning(bundle: ModelBundle) -> str:
    """A plain warning for a model trained on the embedded generated images ('' for any other model)."""
    if not bundle.is_demo:
        return ""
    return (
        '<div class="har-demo-model" role="note" '
        'style="margin:6px 0;padding:6px 8px;background:#fff6d6;border-left:4px solid #e0a800">'
        "<b>Demo model: not for real photos.</b> It was trained only on generated stick figures "
        f"(<code>data.source: {_e(bundle.data_source)}</code>), never on photos of people, so its answers for a "
        "real photo mean nothing, however high the percentage. To classify real photos, train and publish the real "
        f"profile <code>{_e(REAL_PROFILE)}</code> and serve that model.</div>"
    )


def render_model_info(bundle: ModelBundle, p: DashboardParams) -> str:
    """The model panel: name, version, date, training data warning, test metrics, backend, known classes."""
    metrics = " · ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in bundle.metrics.items()) or "no metrics recorded"
    sv = bundle.served
    served = (
        f"{sv.get('variant')} ({Path(str(sv.get('file', ''))).name}): accuracy {float(sv['accuracy']):.3f} · "
        f"calibration error {float(sv['ece']):.3f}"
        if isinstance(sv.get("accuracy"), (int, float)) and isinstance(sv.get("ece"), (int, float))
        else ""
    )
    labels = ", ".join(_e(x) for x in bundle.predictor.labels)
    model_file = Path(str(getattr(bundle.predictor, "model_file", "") or "")).name
    backend = f"{getattr(bundle.predictor, 'backend', '?')}" + (f" ({model_file})" if model_file else "")
    return (
        f'<div class="har-model-info" data-model="{_e(bundle.name)}" data-version="{_e(bundle.version)}" '
        f'data-backend="{_e(getattr(bundle.predictor, "backend", ""))}" '
        f'data-data-source="{_e(bundle.data_source or "")}" data-demo="{str(bundle.is_demo).lower()}">'
        f"<b>Model</b> {_e(bundle.name)} · version <code>{_e(bundle.version)}</code>"
        + (f" · published {_e(short_time(bundle.created))}" if bundle.created else "")
        + render_demo_warning(bundle)
        + f"<br><b>Test metrics</b> {_e(metrics)}"
        + (f"<br><b>As served</b> {_e(served)}" if served else "")
        + (
            f'<details class="har-served-why"><summary>why this file</summary>{_e(sv["reason"])}</details>'
            if served and sv.get("reason")  # the export stage's gate: the cheapest variant that passes, or fallback
            else ""
        )
        + f"<br><b>Runtime</b> {_e(backend)} on {_e(p.device)} · top {p.top_k}"
        f"<details><summary>{len(bundle.predictor.labels)} actions it knows</summary>{labels}</details></div>"
    )


def render_hint(p: DashboardParams) -> str:
    """The upload help line: accepted formats and the size cap."""
    return (
        f'<div class="har-hint">Upload photos of people ({_e(SUPPORTED)}; up to {upload_limits(p)[0] / MIB:g} MiB '
        "each) or paste an image URL. Photos are classified in memory and not stored.</div>"
    )


def render_notice(kind: str, message: str) -> str:
    """A status line: kind is 'busy', 'done', 'error' or 'info'."""
    return f'<div class="har-status har-status-{_e(kind)}" data-state="{_e(kind)}">{_e(message)}</div>'


STATIC = Path(__file__).parent / "static"


def page_css() -> str:
    """The page's style sheet (static/dashboard.css) as a <style> element."""
    return "<style>\n" + (STATIC / "dashboard.css").read_text() + "</style>"


def page_script(max_file_bytes: int, max_batch_bytes: int) -> str:
    """The browser-side script (static/dashboard.js: upload guard, kernel-release cookie) with the upload limits."""
    js = (STATIC / "dashboard.js").read_text()
    js = js.replace("__MAX_FILE_BYTES__", str(int(max_file_bytes))).replace(
        "__MAX_BATCH_BYTES__", str(int(max_batch_bytes))
    )
    return "<script>\n" + js + "</script>"


# --------------------------------------------------------------------------- app


def guarded(status: Any, action: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator for widget callbacks: any exception is logged server-side and shown as a short message."""

    def wrap(fn: Callable[..., None]) -> Callable[..., None]:
        """Wrap one callback."""

        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> None:
            """Run the callback; log and report any failure."""
            try:
                fn(*args, **kwargs)
            except Exception:
                log.exception("%s failed", action)
                status.value = render_notice(
                    "error", f"Something went wrong while {action}; the error was logged. Please try again."
                )

        return inner

    return wrap


def _upload_items(value: Any) -> list[dict[str, Any]]:
    """FileUpload value (ipywidgets 8 tuple of dicts) as plain dicts."""
    items = []
    for item in value or ():
        get = item.get if hasattr(item, "get") else lambda k, d=None, it=item: getattr(it, k, d)
        items.append(
            {
                "name": str(get("name", "") or "upload")[:200],
                "size": int(get("size", 0) or 0),
                "content": get("content", b""),
            }
        )
    return items


def handle_image(
    bundle: ModelBundle,
    p: DashboardParams,
    name: str,
    data: bytes,
    saliency: bool,
    notes: list[str] | None = None,
    log_name: str | None = None,
) -> str:
    """Decode, classify (and optionally explain) one image; an HTML card, or an error card for bad input. The card
    shows name; the service log says log_name (default name)."""
    max_bytes, _ = upload_limits(p)
    log_name = name if log_name is None else log_name
    try:
        img = decode_image(data, max_bytes, p.max_pixels, max_side=DECODE_SIDE)
    except UploadError as exc:
        log.info("refused %r (%d bytes): %s", log_name, len(data), exc)
        return render_error(name, str(exc))
    notes = list(notes or [])
    if bundle.is_demo:
        notes.append(DEMO_CARD_NOTE)
    if img.info.get("animated"):
        notes.append("Animated image: the first frame was classified.")
    try:
        pred = classify(bundle, img, p.top_k)
        overlay, overlay_ms = None, None
        if saliency and pred.top:
            start = time.perf_counter()
            heat, crop = occlusion_map(bundle, img, pred.top[0][0])
            overlay = overlay_heatmap(crop, heat)
            overlay_ms = (time.perf_counter() - start) * 1000.0
        card = render_result(name, img, pred, p.low_confidence, bundle, overlay, overlay_ms, notes)
    except Exception:  # one bad image must not lose the rest of the batch
        log.exception("classifying %r failed", log_name)
        return render_error(name, "This image could not be classified because of an internal error (it was logged).")
    log.info("classified %r: %s %.3f in %.1f ms", log_name, *(pred.top[0] if pred.top else ("-", 0.0)), pred.ms)
    return card


def url_card(bundle: ModelBundle, p: DashboardParams, url: str, saliency: bool) -> str:
    """Fetch a pasted URL (guarded) and classify it: a result card, or an error card saying why not.

    The card shows the URL (on the visitor's own page); the service log names its scheme and host only, since the
    path, query and user name of a pre-signed or token-bearing link are credentials."""
    label = url if len(url) <= 80 else url[:77] + "…"
    origin = url_origin(url)
    try:
        data = fetch_url(url, upload_limits(p)[0], timeout=URL_TIMEOUT_S)
    except UploadError as exc:
        log.info("refused URL at %s: %s", origin, exc)
        return render_error(label, str(exc))
    except Exception as exc:
        # Neither the message nor the traceback: some exceptions (http.client's InvalidURL) quote the whole URL.
        log.error("fetching URL at %s failed: %s", origin, type(exc).__name__)
        return render_error(label, "The image could not be downloaded because of an internal error (it was logged).")
    return handle_image(bundle, p, label, data, saliency, log_name=f"URL at {origin}")


def upload_cards(bundle: ModelBundle, p: DashboardParams, items: list[dict[str, Any]], saliency: bool) -> list[str]:
    """Cards for one upload batch: size checks on the declared size first (the browser sends no bytes past the cap)."""
    max_bytes, batch_bytes = upload_limits(p)
    cards = []
    for item in items[:MAX_FILES_PER_UPLOAD]:
        name, size, content = item["name"], item["size"], bytes(item["content"] or b"")
        if size > max_bytes:
            cards.append(
                render_error(
                    name,
                    f"The file is {size / MIB:.1f} MiB; the limit is {max_bytes / MIB:g} MiB. "
                    "Please send a smaller image.",
                )
            )
        elif size > len(content):
            cards.append(
                render_error(
                    name,
                    f"Not sent: the files selected together exceed {batch_bytes / MIB:g} MiB. Upload fewer at a time.",
                )
            )
        else:
            cards.append(handle_image(bundle, p, name, content, saliency))
    if len(items) > MAX_FILES_PER_UPLOAD:
        skipped = len(items) - MAX_FILES_PER_UPLOAD
        cards.append(
            render_error(f"{skipped} more file(s)", f"Only {MAX_FILES_PER_UPLOAD} images are classified per upload.")
        )
    return cards


def build_app(bundle: ModelBundle, p: DashboardParams) -> Any:
    """The widget tree: upload button, URL box, occlusion toggle, status line, model panel, results."""
    import ipywidgets as widgets

    title = widgets.HTML(f"<h2>What are they doing?</h2>{render_hint(p)}")
    info = widgets.HTML(render_model_info(bundle, p))
    upload = widgets.FileUpload(
        accept=UPLOAD_ACCEPT, multiple=True, description="Upload photos", button_style="primary"
    )
    upload.add_class("har-upload")
    url = widgets.Text(placeholder="https://example.com/photo.jpg")  # sized by dashboard.css (.har-url)
    url.add_class("har-url")
    fetch_button = widgets.Button(description="Classify URL", icon="link")
    fetch_button.add_class("har-url-button")
    saliency = widgets.Checkbox(
        value=False, description="Show where the model looked (occlusion map, slower)", indent=False
    )
    saliency.add_class("har-saliency-toggle")
    clear = widgets.Button(description="Clear results", icon="trash")
    clear.add_class("har-clear")
    status = widgets.HTML(render_notice("info", "Ready."))
    results = widgets.VBox([])
    results.add_class("har-results")

    def show(cards: list[str]) -> None:
        """Prepend cards (newest first), keeping the last KEEP_RESULTS."""
        new = [widgets.HTML(c) for c in reversed(cards)]
        results.children = tuple(new + list(results.children))[:KEEP_RESULTS]

    def set_busy(busy: bool) -> None:
        """Disable the inputs while a request runs."""
        upload.disabled = fetch_button.disabled = busy

    @guarded(status, "classifying the upload")
    def on_upload(change: dict) -> None:
        """Classify every file of a new upload."""
        items = _upload_items(change.get("new"))
        if not items:
            return
        upload.value = ()  # drop the bytes right away; also lets the same file be sent again
        status.value = render_notice("busy", f"Classifying {len(items)} image(s)…")
        set_busy(True)
        try:
            cards = upload_cards(bundle, p, items, saliency.value)
        finally:
            set_busy(False)
        show(cards)
        n_bad = sum(c.startswith('<div class="har-error"') for c in cards)
        status.value = render_notice(
            "done", f"Done: {len(cards) - n_bad} classified" + (f", {n_bad} refused." if n_bad else ".")
        )

    @guarded(status, "fetching the URL")
    def on_fetch(_button: Any) -> None:
        """Download the pasted URL (guarded) and classify it."""
        target = url.value.strip()
        if not target:
            status.value = render_notice("error", "Paste an image URL first.")
            return
        status.value = render_notice("busy", "Downloading the image…")
        set_busy(True)
        try:
            card = url_card(bundle, p, target, saliency.value)
        finally:
            set_busy(False)
        show([card])
        ok = not card.startswith('<div class="har-error"')
        status.value = render_notice("done" if ok else "error", "Done." if ok else "The URL could not be classified.")

    @guarded(status, "clearing the results")
    def on_clear(_button: Any) -> None:
        """Remove every result card."""
        results.children = ()
        status.value = render_notice("info", "Ready.")

    upload.observe(on_upload, names="value")
    fetch_button.on_click(on_fetch)
    clear.on_click(on_clear)
    rows = [widgets.HBox([upload, saliency]), widgets.HBox([url, fetch_button, clear])]
    for row in rows:
        row.add_class("har-controls")  # dashboard.css: the rows wrap on a narrow screen, no label is cut
    controls = widgets.VBox([*rows, status])
    app = widgets.VBox([title, info, controls, results])
    app.add_class("har-app")
    return app


def unpublished_hint(p: DashboardParams, environ: Mapping[str, str] | None = None) -> str | None:
    """What to run first, when the dashboard pulls from a local registry folder that holds nothing to serve (a
    `make dashboard` before `make demo`); commands in backquotes. None otherwise, and always on a served host
    (HAR_MODEL_DIR set, or an S3 registry), whose page never names paths or buckets."""
    environ = os.environ if environ is None else environ
    if environ.get("HAR_MODEL_DIR"):
        return None
    try:
        storage = open_storage(p.registry)
    except RegistryError:
        return None
    if not isinstance(storage, LocalStorage):
        return None
    root = storage.root.resolve()
    wanted = f"{p.model_name!r}" if p.version == "latest" else f"version {p.version!r} of {p.model_name!r}"
    if not root.is_dir():
        found = "which does not exist yet"
    else:
        key = f"{p.model_name}/{LATEST}" if p.version == "latest" else f"{p.model_name}/{p.version}/{MANIFEST}"
        if storage.exists(key):
            return None  # something is published: the failure is another one, and the log says which
        others = sorted(d.name for d in root.iterdir() if (d / LATEST).is_file())
        found = f"which holds no published {wanted}" + (f" (it holds {', '.join(others)})" if others else "")
    demo = load_params(DEFAULT_PARAMS).publish
    demo_storage = open_storage(demo.registry)
    if (
        isinstance(demo_storage, LocalStorage)
        and demo_storage.root.resolve() == root
        and demo.model_name == p.model_name
        and p.version == "latest"
    ):
        first = "Run `make demo` first: it trains the demo model and publishes it there."
    else:
        first = (
            f"Publish {wanted} there first (the pipeline's publish stage; `make demo` publishes "
            f"{demo.model_name!r} to `{demo.registry}`)."
        )
    shown = f"`{p.registry}`" + (f" ({root})" if str(root) != p.registry else "")
    return (
        f"No model to serve yet. The dashboard looked for {wanted} in the registry {shown}, {found}. {first} "
        "Or set `HAR_REGISTRY` and `HAR_MODEL_NAME` to a registry that holds one. Then reload this page."
    )


def render_setup_hint(text: str) -> str:
    """A start-up hint as an error card: escaped, with its backquoted commands and paths as code."""
    body = re.sub(r"`([^`]+)`", r"<code>\1</code>", _e(text))
    return f'<div class="har-error har-setup" data-name="setup">{body}</div>'


def main(params_file: str | Path = DEFAULT_PARAMS, overrides: list[str] | None = None) -> None:
    """Notebook entry point: load settings and model, then display the dashboard (or a clear error, never a
    traceback)."""
    from IPython.display import HTML, display

    setup_logging()
    display(HTML(page_css()))
    p = None
    try:
        p = dashboard_params(params_file, overrides)
        Image.MAX_IMAGE_PIXELS = p.max_pixels
        display(HTML(page_script(*upload_limits(p))))
        stream = server_log_stream()
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            bundle = load_bundle(p)  # progress bars and warnings go to the service log, not the page
        log.info("serving %s %s from %s (%s)", bundle.name, bundle.version, bundle.root, bundle.predictor.backend)
    except Exception as exc:
        # Details (paths, bucket names) stay in the service log; the page says what kind of problem it is. The one
        # exception is a run from a checkout whose local registry is still empty: it names that folder.
        log.exception("dashboard start-up failed")
        hint = None
        if p is not None:
            try:
                hint = unpublished_hint(p)
            except Exception:  # the hint is a courtesy: the generic message below still stands
                log.exception("checking the registry for a start-up hint failed")
        if hint:
            log.warning("%s", hint)
            display(HTML('<div class="har-app">' + render_setup_hint(hint) + "</div>"))
            return
        kind = "its configuration is invalid" if isinstance(exc, ParamsError) else "the model could not be loaded"
        message = f"The dashboard is unavailable: {kind}. The administrator can find the details in the service log."
        display(HTML('<div class="har-app">' + render_error("Sorry", message) + "</div>"))
        return
    display(build_app(bundle, p))
