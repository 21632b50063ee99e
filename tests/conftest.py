"""Shared fixtures: a real S3 endpoint (moto server on 127.0.0.1) with fake credentials in the environment."""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Iterator

import pytest

# Fake, recognisable values: tests grep outputs for them to prove nothing secret leaks.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKETESTKEY7Q2Z",
    "AWS_SECRET_ACCESS_KEY": "fakeSecretKey/for+tests/only+Xq93LmPw7Rt",
    "AWS_SESSION_TOKEN": "fakeSessionToken+for/tests+only9Zr4Kd",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never probe instance metadata for credentials
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",  # ignore the developer's ~/.aws
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}
UNSET_AWS_ENV = (
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto's S3 server for the session; set AWS_ENDPOINT_URL and fake credentials; yield the endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request log lines
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key in UNSET_AWS_ENV:
            mp.delenv(key, raising=False)
        for key, value in FAKE_AWS_ENV.items():
            mp.setenv(key, value)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, not yet created bucket name on the moto server (state lives for the whole session)."""
    return f"test-{uuid.uuid4().hex[:16]}"
