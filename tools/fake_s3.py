"""A local S3 endpoint for tests and rehearsals: moto's server on 127.0.0.1 and fake, recognisable credentials."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

# Fake, recognisable values: tests grep outputs for them to prove nothing secret leaks. Never real keys.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKETESTKEY7Q2Z",
    "AWS_SECRET_ACCESS_KEY": "fakeSecretKey/for+tests/only+Xq93LmPw7Rt",
    "AWS_SESSION_TOKEN": "fakeSessionToken+for/tests+only9Zr4Kd",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never probe instance metadata for credentials
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",  # ignore the developer's ~/.aws
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}
# Settings that would send boto3 elsewhere or to other credentials.
UNSET_AWS_ENV = (
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[Any, str]:
    """Start moto's threaded S3 server on a free 127.0.0.1 port; return (server, endpoint URL). Call server.stop()."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request log lines
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def aws_env(endpoint: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of base (default os.environ) pointing boto3 at endpoint with the fake credentials only."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in UNSET_AWS_ENV}
    return {**env, **FAKE_AWS_ENV, "AWS_ENDPOINT_URL": endpoint}
