"""The landing-zone and corrupt-batch tests against S3: moto's ThreadedMotoServer on 127.0.0.1.

The `test_zone_*` functions are the same objects as in tests/unit (imported below); only the
`zone` fixture differs. A loopback proxy that answers 503 SlowDown to the first requests proves
that botocore's real retry logic, as configured by `make_s3_client`, recovers.
"""

from __future__ import annotations

import http.client
import itertools
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from data_plane.landing import S3LandingZone, make_s3_client, open_landing, read_batch, write_frame
from tests.fixtures_data import make_batch, make_config
from tests.unit import test_arrival, test_hostile_names, test_landing, test_validation

pytestmark = pytest.mark.integration

# The shared test functions: collected here a second time, now with the S3 `zone` fixture.
for _module in (test_arrival, test_hostile_names, test_landing, test_validation):
    globals().update({k: v for k, v in vars(_module).items() if k.startswith("test_zone_")})

_BUCKETS = itertools.count()


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    patch = pytest.MonkeyPatch()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        patch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        patch.delenv(key, raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    patch.undo()


def _new_bucket(endpoint: str) -> str:
    bucket = f"landing-{next(_BUCKETS)}"
    make_s3_client(endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def zone(moto_endpoint: str) -> S3LandingZone:
    bucket = _new_bucket(moto_endpoint)
    landing = open_landing(
        f"s3://{bucket}/landing", s3_client=make_s3_client(endpoint_url=moto_endpoint)
    )
    assert isinstance(landing, S3LandingZone)
    return landing


def test_client_from_standard_environment(moto_endpoint: str, monkeypatch) -> None:
    """`open_landing` without a client: endpoint from AWS_ENDPOINT_URL_S3, like MinIO setups."""
    bucket = _new_bucket(moto_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    landing = open_landing(f"s3://{bucket}")
    write_frame(landing, "2026-11-21", make_batch(30))
    assert landing.list_batches() == ["2026-11-21"]
    assert len(read_batch(landing, "2026-11-21", make_config())) == 30
    retries = landing.client.meta.config.retries  # botocore: 8 retries = 9 attempts in all
    assert retries["mode"] == "adaptive" and retries["total_max_attempts"] == 9


def test_missing_bucket_is_actionable(moto_endpoint: str) -> None:
    landing = open_landing(
        "s3://no-such-bucket/x", s3_client=make_s3_client(endpoint_url=moto_endpoint)
    )
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        landing.list_batches()


class _FlakyProxy(ThreadingHTTPServer):
    """Forwards HTTP to moto, but answers 503 SlowDown to the next `failures` requests."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.failures = 0
        self.failed = 0
        self.forwarded = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    def take_failure(self) -> bool:
        with self.lock:
            if self.failures > 0:
                self.failures -= 1
                self.failed += 1
                return True
            self.forwarded += 1
            return False


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _FlakyProxy
    _SLOW_DOWN = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
        b"<Message>Please reduce your request rate.</Message><RequestId>1</RequestId></Error>"
    )
    _HOP: ClassVar[set[str]] = {"connection", "keep-alive", "transfer-encoding", "proxy-connection"}

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _relay(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.take_failure():
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(self._SLOW_DOWN)))
            self.end_headers()
            self.wfile.write(self._SLOW_DOWN)
            return
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in self._HOP}
        upstream.request(self.command, self.path, body=body or None, headers=headers)
        response = upstream.getresponse()
        payload = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in self._HOP | {"content-length"}:
                self.send_header(key, value)
        self.send_header(
            "Content-Length", response.getheader("Content-Length") or str(len(payload))
        )
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        upstream.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay


@pytest.fixture
def flaky_proxy(moto_endpoint: str) -> Iterator[_FlakyProxy]:
    proxy = _FlakyProxy(moto_endpoint)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()


def test_throttling_and_5xx_are_retried(moto_endpoint: str, flaky_proxy: _FlakyProxy) -> None:
    bucket = _new_bucket(moto_endpoint)
    direct = open_landing(f"s3://{bucket}/p", s3_client=make_s3_client(endpoint_url=moto_endpoint))
    write_frame(direct, "2026-11-21", make_batch(40), fmt="csv")
    host, port = flaky_proxy.server_address[:2]
    client = make_s3_client(endpoint_url=f"http://{host}:{port}")
    flaky = open_landing(f"s3://{bucket}/p", s3_client=client)

    flaky_proxy.failures = 3  # the listing's first three attempts are throttled
    assert flaky.list_batches() == ["2026-11-21"]
    assert flaky_proxy.failed == 3

    flaky_proxy.failures = 2  # then the object read
    frame = read_batch(flaky, "2026-11-21", make_config())
    assert len(frame) == 40 and flaky_proxy.failed == 5

    flaky_proxy.failures = 2  # botocore reports the retries it made
    response = client.list_objects_v2(Bucket=bucket, Prefix="p/")
    assert response["ResponseMetadata"]["RetryAttempts"] == 2
    assert flaky_proxy.failed == 7 and flaky_proxy.forwarded >= 4
