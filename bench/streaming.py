"""Stream a large download and upload through the proxy, hashing both ends, sampling its RSS."""

from __future__ import annotations

import hashlib
import http.client
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from procs import RssSampler
from streaming_upstream import BLOB_SEED, CHUNK_SIZE, blob_chunks, blob_sha256

__all__ = ["BLOB_PATH", "Transfer", "download", "upload"]

BLOB_PATH = "/api/v1/blob"
_UPLOAD_SEED = BLOB_SEED + 1
_MIB = 1024 * 1024


@dataclass(frozen=True)
class Transfer:
    """One streamed transfer through the proxy and the proxy's RSS while it ran."""

    direction: str
    bytes: int
    seconds: float
    sha256_ok: bool
    detail: str
    rss_baseline_mb: float
    rss_peak_mb: float
    rss_samples: int

    @property
    def rss_growth_mb(self) -> float:
        return self.rss_peak_mb - self.rss_baseline_mb

    @property
    def mb_per_s(self) -> float:
        return self.bytes / _MIB / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "rss_growth_mb": self.rss_growth_mb, "mb_per_s": self.mb_per_s}


def _connection(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=120)


def download(port: int, size: int, pids: Sequence[int]) -> Transfer:
    """GET `size` bytes through the proxy, hashing them as they arrive."""
    expected = blob_sha256(size)
    digest, received = hashlib.sha256(), 0
    conn = _connection(port)
    try:
        with RssSampler(pids) as rss:
            started = time.perf_counter()
            conn.request("GET", f"{BLOB_PATH}?bytes={size}")
            response = conn.getresponse()
            while chunk := response.read(CHUNK_SIZE):
                digest.update(chunk)
                received += len(chunk)
            seconds = time.perf_counter() - started
    finally:
        conn.close()
    ok = response.status == 200 and received == size and digest.hexdigest() == expected
    detail = f"HTTP {response.status}, {received} bytes, sha256 {digest.hexdigest()[:16]}…"
    return Transfer(
        "download", received, seconds, ok, detail, rss.baseline_mb, rss.peak_mb, rss.count
    )


def upload(port: int, size: int, pids: Sequence[int]) -> Transfer:
    """POST `size` bytes through the proxy in chunks; the upstream reports what it hashed."""
    digest = hashlib.sha256()
    conn = _connection(port)
    try:
        with RssSampler(pids) as rss:
            started = time.perf_counter()
            conn.putrequest("POST", BLOB_PATH)
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(size))
            conn.endheaders()
            for chunk in blob_chunks(size, _UPLOAD_SEED):
                digest.update(chunk)
                conn.send(chunk)
            response = conn.getresponse()
            body = response.read()
            seconds = time.perf_counter() - started
    finally:
        conn.close()
    try:
        seen = json.loads(body)
    except ValueError:
        seen = None
    if not isinstance(seen, dict):
        seen = {}
    ok = (
        response.status == 200
        and seen.get("bytes") == size
        and seen.get("sha256") == digest.hexdigest()
    )
    detail = f"HTTP {response.status}, upstream saw {seen.get('bytes')} bytes"
    return Transfer("upload", size, seconds, ok, detail, rss.baseline_mb, rss.peak_mb, rss.count)
