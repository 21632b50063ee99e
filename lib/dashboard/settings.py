"""Dashboard settings, imported by both processes: the Voila server (kernel limits) and each kernel (the app).

Every HAR_* environment variable of the service overrides the same key of the params file's dashboard section.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import ValidationError

from lib.files import MIB
from lib.params import DEFAULT_PARAMS, DashboardParams, ParamsError, load_params

# Environment variables of the service; each overrides the same key of the params file's dashboard section.
ENV_PARAMS: dict[str, str] = {
    "HAR_REGISTRY": "registry",
    "HAR_MODEL_NAME": "model_name",
    "HAR_MODEL_VERSION": "version",
    "HAR_TOP_K": "top_k",
    "HAR_DEVICE": "device",
    "HAR_BACKEND": "backend",
    "HAR_PORT": "port",
    "HAR_MAX_UPLOAD_MIB": "max_upload_mib",
    "HAR_MAX_PIXELS": "max_pixels",
    "HAR_LOW_CONFIDENCE": "low_confidence",
}

# Room in one websocket message for the upload's JSON header and file names next to the file bytes.
WEBSOCKET_HEADROOM = 2 * MIB


def dashboard_params(
    params_file: str | Path = DEFAULT_PARAMS,
    overrides: list[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> DashboardParams:
    """The dashboard section of a params file (HAR_PARAMS_FILE replaces it), with HAR_* variables on top."""
    environ = os.environ if environ is None else environ
    params_file = environ.get("HAR_PARAMS_FILE") or params_file
    section = load_params(params_file, overrides).dashboard.model_dump()
    from_env = {key: environ[var] for var, key in ENV_PARAMS.items() if environ.get(var, "").strip()}
    if not from_env:
        return DashboardParams.model_validate(section)
    try:
        return DashboardParams.model_validate({**section, **from_env})
    except ValidationError as exc:
        names = {key: var for var, key in ENV_PARAMS.items()}
        bad = [f"{names.get(str(e['loc'][0]), e['loc'][0])}={e.get('input')!r}: {e['msg']}" for e in exc.errors()]
        raise ParamsError("invalid dashboard environment variables: " + "; ".join(bad)) from None


def env_int(environ: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    """An integer environment variable with a default and a floor; ParamsError names a bad one."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ParamsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ParamsError(f"{name}={value} must be >= {minimum}")
    return value


def upload_limits(p: DashboardParams) -> tuple[int, int]:
    """(bytes per file, bytes per upload message): both the upload cap. Several files selected together travel in
    one websocket message, so together they get the same budget as one file."""
    cap = int(p.max_upload_mib * MIB)
    return cap, cap


def websocket_max_bytes(p: DashboardParams) -> int:
    """The Voila server's websocket message cap (lib.dashboard.server sets it): the upload cap plus headroom, so a
    larger message closes the connection instead of being buffered (the page never sends one: dashboard.js reads
    files past the budget as empty)."""
    return upload_limits(p)[1] + WEBSOCKET_HEADROOM
