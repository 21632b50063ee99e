"""Shared fixtures: a real S3 endpoint (moto server on 127.0.0.1) with fake credentials in the environment."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tools.fake_s3 import FAKE_AWS_ENV, UNSET_AWS_ENV, start_moto


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto's S3 server for the session; set AWS_ENDPOINT_URL and fake credentials; yield the endpoint URL."""
    server, endpoint = start_moto()
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
