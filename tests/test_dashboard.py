"""The Voila dashboard in a real browser (Debian's Chromium driven by Playwright), against a published tiny model."""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from PIL import Image
from test_uploads import heic, psd

from lib.dashboard.headless import CHROMIUM, launch_options, wait_for_port
from lib.params import ROOT, GateParams, ModelParams, Params, VitConfig, save_params
from lib.transforms import ImageSpec, resize_center_crop

# Per test: the tests below that start Voila or a browser; the ones without run in `make test-fast`.
integration = pytest.mark.integration

MODEL_NAME = "har-vit-test"
TOP_K = 3
MAX_UPLOAD_MIB = 20
SCREENSHOT = ROOT / "outputs" / "screenshots" / "dashboard.png"
PHONE_SCREENSHOT = ROOT / "outputs" / "screenshots" / "dashboard-phone.png"
# A phone as Chromium emulates it (390 x 844 CSS pixels, like an iPhone 12-15): the page's meta viewport applies.
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 3, "is_mobile": True, "has_touch": True}
ACCEPTED_TEXT = "JPEG, PNG, WebP, GIF, BMP, TIFF or HEIC/HEIF"
# Largest difference of any class probability between a HEIC photo and its JPEG twin. Both are lossy encodings of
# the same pixels: after decoding they differ by about 1-2 grey levels on average, and measured over 30 real photos
# (../shared/data/har_sample, phone-sized, HEIC quality 60-80 vs JPEG 90) with the model trained on them, the largest
# difference was 0.0034 (the tiny random model here: 0.0002), top-1 always the same. One percentage point leaves
# three times that margin and stays far below what changes the reading of a card (probabilities shown to 0.1 %,
# the low-confidence notice at whole percents).
HEIC_TOLERANCE = 0.01
SERVERS: dict[str, int] = {}  # url -> Voila process id, for counting its kernels
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium missing (apt-get install -y chromium)"
)


# --------------------------------------------------------------------------- shared helpers (test_deploy uses them)


def tiny_model_params() -> ModelParams:
    """A very small ViT so export and inference take a moment only."""
    return ModelParams(
        config=VitConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )


def make_run(run_dir: Path) -> Path:
    """A run folder as the pipeline leaves it: model/, export/ (when lib.export exists), metrics, params, plot."""
    import torch

    from lib.labels import HAR_CLASSES
    from lib.model import build_model, save_model

    torch.manual_seed(0)
    params = Params(model=tiny_model_params())
    model, processor, spec = build_model(params.model, list(HAR_CLASSES))
    save_model(model, processor, spec, run_dir / "model")
    save_params(params, run_dir / "params.yaml")
    served = {"backend": "onnx", "variant": "int8", "file": "export/model.int8.onnx", "accuracy": 0.7969, "ece": 0.0412}
    metrics = {"accuracy": 0.8125, "f1_macro": 0.8, "f1_weighted": 0.81, "n_test": 64, "served": served}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    Image.new("RGB", (32, 32), (240, 240, 240)).save(run_dir / "confusion_matrix.png")
    export_run(run_dir, params)
    return run_dir


def shared_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run folder per test session (built on first use), shared by the dashboard and deploy tests."""
    run_dir = tmp_path_factory.getbasetemp() / "shared-run"
    if not (run_dir / "metrics.json").is_file():
        make_run(run_dir)
    return run_dir


def export_run(run_dir: Path, params: Params) -> None:
    """ONNX fp32 + int8 into export/ with lib.export, serving the int8 file (the torch backend serves without it)."""
    try:
        from lib.export import INT8_FILE, export_model
    except ImportError:
        return
    export_model(run_dir / "model", run_dir / "export", params.export.opset, "dynamic")
    (run_dir / "export" / "serving.json").write_text(json.dumps({"file": INT8_FILE, "reason": "test fixture"}))


def publish_run(run_dir: Path, registry: str) -> dict:
    """Publish a run folder with the gate off; return publish()'s record."""
    from lib.registry.publish import publish

    result = publish(run_dir, registry, MODEL_NAME, GateParams(enabled=False))
    assert result["published"], result
    return result


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 90.0) -> requests.Response:
    """Poll url until HTTP 200 (or the process dies / time runs out)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            resp = requests.get(url, timeout=60)
            if resp.status_code == 200:
                return resp
            last = f"HTTP {resp.status_code}"
        except requests.RequestException as exc:
            last = str(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer 200 in {timeout:.0f}s ({last})")


def voila_command(port: int) -> list[str]:
    """The dashboard's voila command line (as `make dashboard` runs it), on 127.0.0.1:port."""
    return [
        sys.executable,
        "-m",
        "voila",
        "notebooks/dashboard.ipynb",
        "--no-browser",
        "--Voila.ip=127.0.0.1",
        f"--port={port}",
    ]


def stop(proc: subprocess.Popen) -> None:
    """Stop a server we started and wait for it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def photo(label: int = 4, size: tuple[int, int] = (320, 240)) -> bytes:
    """A synthetic stick-figure photo as JPEG bytes."""
    from lib.demo.synthetic import render

    buf = io.BytesIO()
    render(label, np.random.default_rng(label), size).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


# --------------------------------------------------------------------------- without a browser


def test_cards_escape_user_text():
    from html.parser import HTMLParser

    from lib.dashboard.app import render_bars, render_error

    class Tags(HTMLParser):
        """Collects start tags and attribute names."""

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def handle_starttag(self, tag: str, attrs: list) -> None:
            self.seen += [tag] + [name for name, _ in attrs]

    evil = '"><img src=x onerror=alert(1)>'
    for html_text in (render_error(evil, evil), render_bars([(evil, 0.5)])):
        parser = Tags()
        parser.feed(html_text)
        assert "img" not in parser.seen and "onerror" not in parser.seen


def fake_bundle(top: list[tuple[str, float]], spec: ImageSpec | None = None, predictor=None):
    """A ModelBundle whose predictor answers top (the labels in that order) for every image."""
    from lib.dashboard.app import ModelBundle

    predictor = predictor or SimpleNamespace(labels=[label for label, _ in top], backend="fake")
    predictor.top_k = lambda img, k: top[:k]
    return ModelBundle(predictor, spec or ImageSpec(size=32), Path("v7"), "har-vit", "v7")


class RedCounter:
    """A predictor whose first label's probability is 0.1 + 0.8 x the share of pure red pixels in what the model
    sees (the eval resize and center crop of each image): hiding red lowers it, nothing else does."""

    def __init__(self, spec: ImageSpec, red_pixels: int) -> None:
        self.spec, self.red_pixels = spec, red_pixels
        self.labels = ["target", "other"]
        self.batches: list[list[Image.Image]] = []

    def predict_proba(self, images: list[Image.Image]) -> np.ndarray:
        self.batches.append(list(images))
        rows = []
        for img in images:
            seen = np.asarray(resize_center_crop(img, self.spec))
            share = np.all(seen == (255, 0, 0), axis=-1).sum() / self.red_pixels
            rows.append([0.1 + 0.8 * share, 0.9 - 0.8 * share])
        return np.asarray(rows)


def test_occlusion_greys_out_each_cell_of_the_model_input():
    from lib.dashboard.app import occlusion_map

    # 37 x 50 is already the resize (shorter side 32 / 0.875 = 37): the center crop starts at (2, 9), so a grid laid
    # over the uncropped image, a swapped row and column, or a cell off by the crop all move the hot cell.
    spec = ImageSpec(size=32, mean=(0.25, 0.5, 0.75), std=(0.5, 0.5, 0.5), crop_pct=0.875)
    grid, cell, left, top = 8, 4, 2, 9
    row, col = 2, 5
    img = Image.new("RGB", (37, 50), (90, 90, 90))
    img.paste((255, 0, 0), (left + col * cell, top + row * cell, left + (col + 1) * cell, top + (row + 1) * cell))
    predictor = RedCounter(spec, red_pixels=cell * cell)
    bundle = fake_bundle([("target", 0.9)], spec, predictor)
    heat, crop = occlusion_map(bundle, img, "target", grid)
    expected = np.zeros((grid, grid))
    expected[row, col] = 1.0
    np.testing.assert_allclose(heat, expected, atol=1e-9)
    assert np.array_equal(np.asarray(crop), np.asarray(resize_center_crop(img, spec)))
    (batch,) = predictor.batches  # one call: the plain input, then one image per cell, row by row
    assert len(batch) == 1 + grid * grid
    assert np.array_equal(np.asarray(batch[0]), np.asarray(img))
    hidden = np.asarray(resize_center_crop(batch[1 + row * grid + col], spec))
    assert hidden[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell].tolist() == [[[64, 128, 191]] * 4] * 4
    changed = np.any(hidden != np.asarray(crop), axis=-1)
    assert changed.sum() == cell * cell  # that cell only, greyed in the normalisation mean


def test_occlusion_input_is_what_the_predictor_sees(tmp_path_factory: pytest.TempPathFactory):
    from lib.dashboard.app import load_bundle, model_input_view, occlusion_map
    from lib.params import DashboardParams

    bundle = load_bundle(DashboardParams(), {"HAR_MODEL_DIR": str(shared_run(tmp_path_factory))})
    img = Image.open(io.BytesIO(photo(2, (301, 187)))).convert("RGB")
    resized, _ = model_input_view(img, bundle.spec)
    # the predictor resizes again: an occluded copy of the resized image must reach the model as it is
    np.testing.assert_allclose(
        bundle.predictor.predict_proba([resized]), bundle.predictor.predict_proba([img]), atol=1e-6
    )
    heat, crop = occlusion_map(bundle, img, bundle.predictor.labels[0])
    assert heat.shape == (bundle.patch_grid, bundle.patch_grid) and crop.size == (bundle.spec.size,) * 2


def test_low_confidence_notice_shows_only_below_the_threshold():
    from lib.dashboard.app import Prediction, render_result

    img = Image.new("RGB", (40, 30), (10, 120, 200))
    for top, low in ((0.93, False), (0.5, False), (0.4999, True), (0.12, True)):
        pred = Prediction(top=[("running", top), ("walking", (1 - top) / 2)], ms=3.0)
        card = render_result("a.jpg", img, pred, 0.5, fake_bundle(pred.top))
        assert f'data-low-confidence="{str(low).lower()}"' in card, top
        assert ('class="har-low-confidence"' in card) is low, top
        assert "below 50%" in card if low else "Low confidence" not in card


@pytest.fixture
def dashboard_log() -> Iterator[list[str]]:
    """Every record the dashboard logs (its logger may not propagate: setup_logging sends it to the service log)."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Keep(logging.DEBUG)
    logger = logging.getLogger("har.dashboard")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


SECRET = "hunter2-SIG-0042"


@pytest.mark.parametrize(
    ("url", "origin", "refusal"),
    [
        (f"https://alice:{SECRET}@photos.example.com/a.jpg?t={SECRET}", "https://photos.example.com", "user name"),
        (f"http://169.254.169.254/latest/meta-data/iam/{SECRET}", "http://169.254.169.254", "private or reserved"),
        (f"http://[::1]:8080/{SECRET}.jpg", "http://[::1]:8080", "private or reserved"),
        (f"file:///home/alice/{SECRET}.jpg", "file:", "Only http"),
        (f"https://93.184.215.14:22/{SECRET}", "https://93.184.215.14:22", "Port 22"),
    ],
    ids=["userinfo", "metadata", "ipv6", "file", "port"],
)
def test_refused_urls_are_logged_by_scheme_and_host_only(dashboard_log: list[str], url: str, origin: str, refusal):
    from lib.dashboard.app import url_card
    from lib.params import DashboardParams

    card = url_card(fake_bundle([("running", 0.9)]), DashboardParams(), url, saliency=False)
    assert card.startswith('<div class="har-error"') and refusal in card
    assert dashboard_log and all(SECRET not in line for line in dashboard_log), dashboard_log
    assert any(f"at {origin}:" in line for line in dashboard_log), dashboard_log


def test_classified_and_failed_urls_are_logged_by_scheme_and_host_only(
    dashboard_log: list[str], monkeypatch: pytest.MonkeyPatch
):
    from lib.dashboard import app
    from lib.params import DashboardParams

    presigned = (
        "https://bucket.s3.eu-west-1.amazonaws.com/people/IMG_0042.jpg?X-Amz-Credential=AKIAEXAMPLE%2F20250101"
        f"&X-Amz-Signature={SECRET}"
    )
    assert len(presigned) > 80  # the card shows it cut; no part of it may reach the log
    monkeypatch.setattr(app, "fetch_url", lambda url, max_bytes, timeout: photo(4))
    card = app.url_card(fake_bundle([("running", 0.9), ("walking", 0.05)]), DashboardParams(), presigned, False)
    assert (
        card.startswith('<div class="har-result"') and 'data-name="https://bucket.s3.eu-west-1.amazonaws.com/' in card
    )
    assert dashboard_log == [
        "classified 'URL at https://bucket.s3.eu-west-1.amazonaws.com': running 0.900 in "
        + dashboard_log[0].rsplit(" in ", 1)[1]
    ]

    def invalid(url: str, max_bytes: int, timeout: float) -> bytes:
        raise http.client.InvalidURL(f"URL can't contain control characters. {url!r}")

    monkeypatch.setattr(app, "fetch_url", invalid)
    card = app.url_card(fake_bundle([("running", 0.9)]), DashboardParams(), presigned, False)
    assert card.startswith('<div class="har-error"') and "internal error" in card
    assert len(dashboard_log) == 2 and "https://bucket.s3.eu-west-1.amazonaws.com" in dashboard_log[1]
    for line in dashboard_log:
        assert SECRET not in line and "X-Amz" not in line and "IMG_0042" not in line, line


def test_upload_cards_check_declared_and_real_sizes(tmp_path_factory: pytest.TempPathFactory):
    from lib.dashboard.app import load_bundle, upload_cards
    from lib.params import DashboardParams

    p = DashboardParams(max_upload_mib=1, top_k=2)
    bundle = load_bundle(p, {"HAR_MODEL_DIR": str(shared_run(tmp_path_factory))})
    good = photo(1)
    items = [
        {"name": "big.jpg", "size": 5 * 1024 * 1024, "content": b""},  # the browser guard sent no bytes
        {"name": "skipped.jpg", "size": 1000, "content": b""},  # past the batch budget
        {"name": "liar.jpg", "size": 10, "content": good + b"\0" * (2 * 1024 * 1024)},  # a client lying about size
        {"name": "ok.jpg", "size": len(good), "content": memoryview(good)},
    ]
    cards = upload_cards(bundle, p, items, saliency=True)
    assert "limit is 1 MiB" in cards[0] and "Not sent" in cards[1] and "limit is 1.0 MiB" in cards[2]
    assert cards[3].startswith('<div class="har-result"') and cards[3].count('class="har-pred"') == 2
    assert 'class="har-saliency"' in cards[3]
    many = upload_cards(bundle, p, [items[3]] * 10, saliency=False)
    assert len(many) == 9 and "Only 8 images" in many[-1]


def test_demo_model_says_so_in_the_model_panel():
    from lib.dashboard.app import ModelBundle, render_model_info, training_data_source
    from lib.params import DashboardParams

    predictor = SimpleNamespace(labels=["calling", "eating"], backend="onnx", model_file="export/model.int8.onnx")

    def panel(source: str | None) -> str:
        """The model panel for a model trained on source."""
        bundle = ModelBundle(predictor, None, Path("v1"), "har-vit", "v1", data_source=source)  # type: ignore[arg-type]
        return render_model_info(bundle, DashboardParams())

    demo = panel("embedded")
    assert 'data-demo="true"' in demo and 'class="har-demo-model"' in demo
    for words in ("Demo model: not for real photos", "generated stick figures", "<code>params/har_vit.yaml</code>"):
        assert words in demo
    for source in ("hub:Bingsu/Human_Action_Recognition[train]", "imagefolder", None):
        assert 'class="har-demo-model"' not in panel(source) and 'data-demo="false"' in panel(source)
    # metrics.json's record of the data first, then params.yaml
    assert training_data_source({"data": {"source": "embedded"}}, None) == "embedded"
    recorded = {"data": {"source": "hub:x[train]"}}
    assert training_data_source(recorded, {"data": {"source": "embedded"}}) == "hub:x[train]"
    assert training_data_source({}, {"data": {"source": "hub", "hub_id": "x"}}) == "hub"
    assert training_data_source({}, {"data": {"source": "embedded", "embedded": {"seed": 0}}}) == "embedded"
    assert training_data_source({"data": "?"}, {"run": {"name": "x"}}) is None
    assert training_data_source({}, None) is None


def test_upload_help_lists_the_accepted_formats():
    from lib.dashboard.app import UPLOAD_ACCEPT, render_hint
    from lib.params import DashboardParams

    hint = render_hint(DashboardParams(max_upload_mib=20))
    assert ACCEPTED_TEXT in hint and "up to 20 MiB each" in hint
    assert ".heic" in UPLOAD_ACCEPT.split(",") and "image/*" in UPLOAD_ACCEPT.split(",")


def test_heic_phone_photo_classifies_like_its_jpeg_twin(tmp_path_factory: pytest.TempPathFactory):
    from lib.dashboard.app import DECODE_SIDE, handle_image, load_bundle
    from lib.dashboard.settings import upload_limits
    from lib.dashboard.uploads import decode_image
    from lib.params import DashboardParams

    p = DashboardParams(top_k=3)
    bundle = load_bundle(p, {"HAR_MODEL_DIR": str(shared_run(tmp_path_factory))})
    upright = Image.open(io.BytesIO(photo(5, (900, 1200)))).convert("RGB")
    # A portrait shot as a phone stores it: sensor-wise (landscape) pixels, EXIF orientation 6 to turn them upright.
    # pillow-heif writes that orientation as the HEIF rotation property too, as phones do.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    twins = {"JPEG": encode_oriented(stored, "JPEG", 90), "HEIF": heic(stored, orientation=6, quality=60)}
    assert twins["HEIF"][4:12] == b"ftypheic"
    decoded = {fmt: decode_image(data, upload_limits(p)[0], p.max_pixels, DECODE_SIDE) for fmt, data in twins.items()}
    assert decoded["JPEG"].size == decoded["HEIF"].size == (768, 1024)  # upright, shrunk to DECODE_SIDE
    pixels = {fmt: np.asarray(img, np.float32) for fmt, img in decoded.items()}
    mae = float(np.abs(pixels["JPEG"] - pixels["HEIF"]).mean())
    flipped = float(np.abs(pixels["JPEG"] - pixels["HEIF"][::-1, ::-1]).mean())
    assert mae < 4 and flipped > 4 * mae, (mae, flipped)  # codec noise only; a doubled rotation shows
    p_jpeg, p_heic = np.asarray(bundle.predictor.predict_proba([decoded["JPEG"], decoded["HEIF"]]))
    assert p_jpeg.argmax() == p_heic.argmax()
    assert np.abs(p_jpeg - p_heic).max() <= HEIC_TOLERANCE
    # the page's own path: a result card with the same top class, and the demo model's note
    card = handle_image(bundle, p, "IMG_0042.HEIC", twins["HEIF"], saliency=False)
    top = bundle.predictor.labels[int(p_jpeg.argmax())]
    assert card.startswith('<div class="har-result"') and f'data-top-label="{top}"' in card
    assert bundle.is_demo and "generated stick figures only" in card


def encode_oriented(img: Image.Image, fmt: str, quality: int, orientation: int = 6) -> bytes:
    """img encoded with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, fmt, quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def test_start_up_failure_is_a_message_not_a_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import IPython.display

    from lib.dashboard import app as dashboard

    shown: list[str] = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(getattr(obj, "data", repr(obj))))
    # A served host: the model folder the bootstrap pulled is gone. The page names no path.
    monkeypatch.setenv("HAR_MODEL_DIR", str(tmp_path / "no-such-model"))
    dashboard.main(ROOT / "params" / "demo.yaml")
    page = "".join(shown)
    assert "The dashboard is unavailable: the model could not be loaded" in page
    assert "Traceback" not in page and "no-such-model" not in page and "make demo" not in page
    shown.clear()
    monkeypatch.setenv("HAR_TOP_K", "99")
    dashboard.main(ROOT / "params" / "demo.yaml")
    assert "its configuration is invalid" in "".join(shown)


def demo_profile(tmp_path: Path, registry: Path, model_name: str = "har-vit-demo") -> Path:
    """A copy of params/demo.yaml whose pipeline publishes model_name to registry."""
    import yaml

    tree = yaml.safe_load((ROOT / "params" / "demo.yaml").read_text())
    tree["publish"].update(registry=str(registry), model_name=model_name)
    tree["dashboard"].update(registry=str(registry), model_name=model_name)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_dashboard_before_the_demo_says_what_to_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """`make dashboard` before `make demo`: the page says to run the demo first and names the registry it read."""
    import IPython.display

    from lib.dashboard import app as dashboard

    registry = tmp_path / "outputs" / "registry"
    profile = demo_profile(tmp_path, registry)
    monkeypatch.setattr(dashboard, "DEFAULT_PARAMS", profile)
    monkeypatch.delenv("HAR_MODEL_DIR", raising=False)
    monkeypatch.delenv("HAR_REGISTRY", raising=False)
    monkeypatch.delenv("HAR_MODEL_NAME", raising=False)
    shown: list[str] = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(getattr(obj, "data", repr(obj))))
    dashboard.main(profile)
    page = "".join(shown)
    assert 'class="har-error har-setup"' in page and "Traceback" not in page
    assert "Run <code>make demo</code> first" in page
    assert f"<code>{registry}</code>, which does not exist yet" in page
    assert "unavailable" not in page


def test_setup_hint_names_the_registry_and_what_it_holds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from lib.dashboard import app as dashboard
    from lib.params import DashboardParams

    registry = tmp_path / "registry"
    monkeypatch.setattr(dashboard, "DEFAULT_PARAMS", demo_profile(tmp_path, registry))
    for name in ("har-vit", "birds"):
        (registry / name).mkdir(parents=True)
        (registry / name / "latest.json").write_text("{}")
    (registry / "har-vit-demo" / "20250101T000000Z-abc").mkdir(parents=True)  # an interrupted publish

    def hint(environ: dict | None = None, **kwargs) -> str | None:
        """The hint for the dashboard section kwargs (the registry above, the demo's name by default)."""
        p = DashboardParams(**({"registry": str(registry), "model_name": "har-vit-demo"} | kwargs))
        return dashboard.unpublished_hint(p, environ or {})

    nothing = hint()
    assert f"registry `{registry}`, which holds no published 'har-vit-demo' (it holds birds, har-vit)" in nothing
    assert "Run `make demo` first" in nothing
    other = hint(model_name="cats")
    assert "holds no published 'cats'" in other and "make demo` first" not in other
    assert "Publish 'cats' there first (the pipeline's publish stage; `make demo` publishes 'har-vit-demo'" in other
    assert "holds no published version 'v1' of 'har-vit'" in hint(model_name="har-vit", version="v1")
    assert hint(model_name="har-vit") is None  # published: the failure is another one
    assert hint({"HAR_MODEL_DIR": str(tmp_path)}) is None  # a served host names no paths
    assert hint(registry="s3://some-bucket/models") is None


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Voila serving the dashboard on a free port, with a model published into a local registry."""
    tmp = tmp_path_factory.mktemp("dashboard")
    publish_run(shared_run(tmp_path_factory), str(tmp / "registry"))
    port = free_port()
    env = {
        **os.environ,
        "HAR_REGISTRY": str(tmp / "registry"),
        "HAR_MODEL_NAME": MODEL_NAME,
        "HAR_TOP_K": str(TOP_K),
        "HAR_MAX_UPLOAD_MIB": str(MAX_UPLOAD_MIB),
        "HAR_REGISTRY_CACHE": str(tmp / "cache"),
        "HAR_MAX_KERNELS": "4",
        "HAR_THREADS": "1",
    }
    log = open(tmp / "voila.log", "w")
    proc = subprocess.Popen(voila_command(port), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc)
        SERVERS[f"http://127.0.0.1:{port}/"] = proc.pid
        yield f"http://127.0.0.1:{port}/"
    finally:
        stop(proc)
        log.close()
        print((tmp / "voila.log").read_text()[-3000:])  # shown by pytest when a test failed


@pytest.fixture(scope="module")
def page(server: str) -> Iterator[object]:
    """One browser page on the dashboard, shared by the tests in order (one visitor, one kernel)."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium missing (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(**launch_options())
        pg = browser.new_page(viewport={"width": 1100, "height": 900})
        pg.set_default_timeout(60_000)
        pg.goto(server)
        pg.wait_for_selector(".har-model-info", timeout=90_000)
        yield pg
        browser.close()


def kernel_count(server_url: str) -> int:
    """Number of ipykernel processes under the Voila server serving server_url."""
    import psutil

    count = 0
    for child in psutil.Process(SERVERS[server_url]).children(recursive=True):
        try:
            count += child.status() != psutil.STATUS_ZOMBIE and "ipykernel_launcher" in " ".join(child.cmdline())
        except psutil.Error:  # exited (or a zombie) meanwhile
            pass
    return count


def cards(pg) -> int:
    """Number of result and error cards on the page."""
    return pg.locator(".har-results .har-result, .har-results .har-error").count()


def upload(pg, files: list, expect: int) -> None:
    """Choose files through the upload button's file chooser; wait for `expect` new cards."""
    before = cards(pg)
    with pg.expect_file_chooser() as chooser:
        pg.click(".har-upload")
    chooser.value.set_files(files)
    pg.wait_for_function(
        f"document.querySelectorAll('.har-results .har-result, .har-results .har-error').length >= {before + expect}"
    )


def payload(name: str, data: bytes, mime: str = "image/jpeg") -> dict:
    """A Playwright file payload."""
    return {"name": name, "mimeType": mime, "buffer": data}


def newest(pg, selector: str):
    """The newest card (results are prepended) matching selector."""
    return pg.locator(f".har-results {selector}").first


# --------------------------------------------------------------------------- tests (they share one page, in order)


@integration
@needs_chromium
def test_page_shows_model_and_no_source(page, server: str):
    info = page.locator(".har-model-info")
    assert info.get_attribute("data-model") == MODEL_NAME
    assert info.get_attribute("data-version")
    assert "accuracy 0.812" in info.inner_text()
    assert "As served int8 (model.int8.onnx): accuracy 0.797 · calibration error 0.041" in info.inner_text()
    # the test model was trained (as make demo's is) on the embedded generated images: the panel says so
    assert info.get_attribute("data-demo") == "true"
    assert "Demo model: not for real photos" in info.inner_text() and "params/har_vit.yaml" in info.inner_text()
    assert ACCEPTED_TEXT in page.locator(".har-hint").inner_text()
    with page.expect_file_chooser() as chooser:  # the widget's file input lives outside the page's DOM tree
        page.click(".har-upload")
    assert ".heic" in (chooser.value.element.get_attribute("accept") or "").split(",")
    content = page.content()
    for leak in ("from lib.dashboard.app import main", "params_file =", "main(params_file", "Traceback"):
        assert leak not in content
    # no file serving, no notebook download, no Jupyter API to run code
    for path in (
        "voila/files/dashboard.ipynb",
        "dashboard.ipynb",
        "voila/files/confusion.png",
        "api/contents",
        "api/sessions",
        "api/kernels",
        "lab",
        "tree",
    ):
        resp = requests.get(server + path, timeout=30)
        assert resp.status_code in (403, 404, 405), (path, resp.status_code)


@integration
@needs_chromium
def test_valid_image_shows_top_k_descending(page, tmp_path_factory: pytest.TempPathFactory):
    from lib.dashboard.app import DECODE_SIDE, load_bundle
    from lib.dashboard.uploads import decode_image
    from lib.params import DashboardParams

    data = photo(11)
    upload(page, [payload("runner.jpg", data)], expect=1)
    card = newest(page, ".har-result")
    assert card.get_attribute("data-name") == "runner.jpg"
    rows = card.locator(".har-pred")
    shown = [
        (rows.nth(i).get_attribute("data-label"), float(rows.nth(i).get_attribute("data-prob")))
        for i in range(rows.count())
    ]
    # The same model file in this process, on the image as the page decodes it: the bars are its top-k, in order.
    p = DashboardParams(top_k=TOP_K)
    bundle = load_bundle(p, {"HAR_MODEL_DIR": str(shared_run(tmp_path_factory)), "HAR_THREADS": "1"})
    expected = bundle.predictor.top_k(
        decode_image(data, MAX_UPLOAD_MIB * 1024 * 1024, p.max_pixels, DECODE_SIDE), TOP_K
    )
    assert [label for label, _ in shown] == [str(label) for label, _ in expected]
    np.testing.assert_allclose([prob for _, prob in shown], [float(prob) for _, prob in expected], atol=1e-5)
    assert [prob for _, prob in shown] == sorted((prob for _, prob in shown), reverse=True)
    assert card.get_attribute("data-top-label") == shown[0][0]
    assert float(card.get_attribute("data-ms")) > 0
    assert "predicted in" in card.locator(".har-time").inner_text()
    assert card.locator(".har-image").count() == 1
    # a random tiny model is never confident: the notice shows (its absence above the threshold is a unit test)
    assert shown[0][1] < p.low_confidence
    assert card.get_attribute("data-low-confidence") == "true"
    assert card.locator(".har-low-confidence").count() == 1


@integration
@needs_chromium
def test_corrupt_file_then_valid_upload_still_works(page):
    data = photo(3)
    upload(page, [payload("broken.jpg", data[: len(data) // 3])], expect=1)
    err = newest(page, ".har-error")
    assert err.get_attribute("data-name") == "broken.jpg"
    assert "damaged or truncated" in err.inner_text()
    assert "Traceback" not in page.content()
    upload(page, [payload("after.jpg", photo(5))], expect=1)
    assert newest(page, ".har-result").get_attribute("data-name") == "after.jpg"


@integration
@needs_chromium
def test_mixed_batch_reports_each_file(page, tmp_path: Path):
    Image.new("RGBA", (80, 60), (0, 0, 255, 128)).save(tmp_path / "alpha.png")
    (tmp_path / "notes.txt").write_bytes(b"just some text\n" * 20)
    (tmp_path / "empty.jpg").write_bytes(b"")
    huge = tmp_path / "huge.jpg"  # over the cap: the browser sends it without its bytes
    huge.write_bytes(b"\xff\xd8" + b"\0" * (MAX_UPLOAD_MIB * 1024 * 1024 + 10))
    (tmp_path / "layers.jpg").write_bytes(psd(64, 48))  # a Photoshop file renamed .jpg
    (tmp_path / "IMG_0042.HEIC").write_bytes(heic(Image.open(io.BytesIO(photo(7))), orientation=6, quality=60))
    names = ("notes.txt", "empty.jpg", "huge.jpg", "layers.jpg", "IMG_0042.HEIC", "alpha.png")
    upload(page, [str(tmp_path / name) for name in names], expect=len(names))
    errors = {e.get_attribute("data-name"): e.inner_text() for e in page.locator(".har-results .har-error").all()}
    assert "not an image" in errors["notes.txt"]
    assert "empty" in errors["empty.jpg"]
    assert f"limit is {MAX_UPLOAD_MIB} MiB" in errors["huge.jpg"]
    assert "Photoshop (PSD)" in errors["layers.jpg"] and ACCEPTED_TEXT in errors["layers.jpg"]
    assert newest(page, ".har-result").get_attribute("data-name") == "alpha.png"
    assert page.locator('.har-results .har-result[data-name="IMG_0042.HEIC"]').count() == 1
    assert "4 refused" in page.locator(".har-status").inner_text()


@integration
@needs_chromium
def test_phone_size_photo_passes_the_websocket(page, tmp_path: Path):
    noise = np.random.default_rng(1).integers(0, 255, (2000, 2100, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "phone.bmp")
    assert (tmp_path / "phone.bmp").stat().st_size > 12 * 1024 * 1024  # over tornado's default 10 MiB message cap
    upload(page, [str(tmp_path / "phone.bmp")], expect=1)
    assert newest(page, ".har-result").get_attribute("data-name") == "phone.bmp"


@integration
@needs_chromium
def test_upload_batch_budget_is_enforced_in_the_browser(page):
    limits = page.evaluate("window.harUploadLimits")
    page.evaluate("window.harUploadLimits = {file: window.harUploadLimits.file, batch: 300000}")
    try:
        upload(
            page,
            [payload("first.jpg", photo(1, (900, 700))), payload("second.bmp", b"BM" + b"\0" * 299_000, "image/bmp")],
            expect=2,
        )
    finally:
        page.evaluate(f"window.harUploadLimits = {json.dumps(limits)}")
    assert newest(page, ".har-error").get_attribute("data-name") == "second.bmp"
    assert "Not sent" in newest(page, ".har-error").inner_text()


@integration
@needs_chromium
def test_url_to_metadata_service_is_refused(page):
    for url, message in (
        ("http://169.254.169.254/latest/meta-data/", "private or reserved"),
        ("file:///etc/passwd", "Only http"),
    ):
        before = cards(page)
        page.fill(".har-url input", url)
        page.click(".har-url-button")
        page.wait_for_function(
            f"document.querySelectorAll('.har-results .har-result, .har-results .har-error').length > {before}"
        )
        assert message in newest(page, ".har-error").inner_text()


@integration
@needs_chromium
def test_occlusion_map_and_screenshot(page):
    page.click(".har-saliency-toggle input")
    upload(page, [payload("dancer.jpg", photo(3, (300, 400)))], expect=1)
    card = newest(page, ".har-result")
    assert card.locator(".har-saliency").count() == 1
    assert "occlusion map" in card.locator(".har-time").inner_text()
    content = page.content()
    assert "INFO classified" not in content and "Traceback" not in content  # server logs never reach the page
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000


@integration
@needs_chromium
def test_leaving_the_page_frees_the_kernel(page, server: str):
    assert kernel_count(server) == 1
    page.goto("about:blank")  # beforeunload: Voila's shutdown beacon (needs the _xsrf cookie the page sets)
    deadline = time.monotonic() + 20
    while kernel_count(server) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert kernel_count(server) == 0


# Every control's label element, its text, its scroll and client widths, and its box, as the browser lays them out.
CONTROL_BOXES_JS = """() => {
  const controls = {upload: '.har-upload', saliency: '.har-saliency-toggle', url: '.har-url',
                    fetch: '.har-url-button', clear: '.har-clear'};
  const found = [];
  for (const [name, selector] of Object.entries(controls)) {
    const root = document.querySelector(selector);
    if (!root) { found.push({name, missing: true}); continue; }
    for (const el of [root, ...root.querySelectorAll('label, button, input')]) {
      if (!el.getClientRects().length) continue;  // not rendered (the widgets' unused description labels)
      const box = el.getBoundingClientRect();
      found.push({name, tag: el.tagName, text: (el.innerText || el.placeholder || '').trim(),
                  scrollWidth: el.scrollWidth, clientWidth: el.clientWidth,
                  left: box.left, right: box.right, width: box.width, height: box.height});
    }
  }
  const cards = [...document.querySelectorAll('.har-results .har-result')].map(card => {
    const box = card.getBoundingClientRect();
    return {name: 'card', tag: card.tagName, text: card.dataset.name, scrollWidth: card.scrollWidth,
            clientWidth: card.clientWidth, left: box.left, right: box.right, width: box.width, height: box.height};
  });
  return {viewport: document.documentElement.clientWidth, page: document.documentElement.scrollWidth,
          found: found.concat(cards)};
}"""
CONTROL_TEXTS = {
    "upload": "Upload photos",
    "saliency": "Show where the model looked (occlusion map, slower)",
    "fetch": "Classify URL",
    "clear": "Clear results",
}


@integration
@needs_chromium
def test_controls_fit_a_phone_screen(page, server: str):
    """On a 390 px phone every control shows its whole label inside the screen, and so does a result card."""
    context = page.context.browser.new_context(**PHONE)  # a second visitor, on a phone
    try:
        phone = context.new_page()
        phone.set_default_timeout(60_000)
        phone.goto(server)
        phone.wait_for_selector(".har-model-info", timeout=90_000)
        upload(phone, [payload("IMG_0007.jpg", photo(7, (1200, 1600)))], expect=1)  # a portrait phone photo
        layout = phone.evaluate(CONTROL_BOXES_JS)
        PHONE_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        phone.screenshot(path=str(PHONE_SCREENSHOT), full_page=True)
        phone.goto("about:blank")  # frees its kernel
    finally:
        context.close()
    width = layout["viewport"]
    assert width == PHONE["viewport"]["width"] and layout["page"] <= width, layout
    elements = layout["found"]
    assert not [e for e in elements if e.get("missing")], elements
    hidden = [
        e
        for e in elements
        if not (e["width"] > 0 and e["height"] > 0)
        or not (0 <= e["left"] and e["right"] <= width)  # off the screen
        or e["scrollWidth"] > e["clientWidth"]  # cut off (ellipsis, overflow)
    ]
    assert not hidden, "\n".join(map(str, hidden))
    for name, text in CONTROL_TEXTS.items():
        assert any(text in e["text"] for e in elements if e["name"] == name), (name, elements)
    assert [e["text"] for e in elements if e["name"] == "card"] == ["IMG_0007.jpg"]
