"""Prometheus metrics: what an operator watches, served at `/metrics`.

Labels carry only bounded, non-secret values: the templated route (never a raw id), the method
(unknown ones folded into `OTHER`), the status, the decision and the client's name. The token
appears only as its fingerprint.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from proxy.credentials import TokenHolder
from proxy.policy import METHOD_PERMISSIONS

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
# From a fast local answer to InvoisX's slowest document submissions.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_NO_ROUTE = "none"  # refused before a route could be read (bad or foreign path)


class _TokenCollector(Collector):
    """Token facts read at scrape time, so a rotation shows without bookkeeping."""

    def __init__(self, holder: TokenHolder) -> None:
        self._holder = holder

    def collect(self) -> Iterator[Metric]:
        token = self._holder.current
        info = GaugeMetricFamily(
            "invoisx_proxy_token_info", "The token in use, by fingerprint.", labels=["fingerprint"]
        )
        info.add_metric([token.fingerprint], 1)
        yield info
        if token.expires_at is not None:
            yield GaugeMetricFamily(
                "invoisx_proxy_token_expiry_timestamp_seconds",
                "When the token in use expires (Unix seconds).",
                value=token.expires_at.timestamp(),
            )


class Metrics:
    """The proxy's metrics in a registry of its own (never the process-global one)."""

    def __init__(self, holder: TokenHolder) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_TokenCollector(holder))
        self._requests = Counter(
            "invoisx_proxy_requests",
            "API calls answered, by outcome.",
            ["method", "route", "status", "decision", "client"],
            registry=self.registry,
        )
        self._request_seconds = Histogram(
            "invoisx_proxy_request_duration_seconds",
            "Whole API calls through the proxy.",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self._upstream_seconds = Histogram(
            "invoisx_proxy_upstream_duration_seconds",
            "Time until InvoisX's response headers.",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self._ratelimit_wait_seconds = Histogram(
            "invoisx_proxy_ratelimit_wait_seconds",
            "Time calls waited in the local rate-limit queue (calls that waited at all).",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self._reloads = Counter(
            "invoisx_proxy_token_reloads",
            "Token file reloads, by result.",
            ["result"],
            registry=self.registry,
        )
        self._ratelimit_remaining = Gauge(
            "invoisx_proxy_upstream_ratelimit_remaining",
            "InvoisX's X-RateLimit-Remaining on its latest response.",
            registry=self.registry,
        )
        self._auth_failures = Counter(
            "invoisx_proxy_upstream_auth_failures",
            "InvoisX refused the token itself (401/403 with a token-level error code).",
            registry=self.registry,
        )
        for result in ("success", "unchanged", "error"):
            self._reloads.labels(result)  # shown at 0 from the start, so alerts can use rate()
        # Label lookups take a lock and build tuples; the label sets are bounded, so keep them.
        self._request_counters: dict[tuple[str, str, int, str, str], Counter] = {}

    def request(
        self,
        *,
        method: str,
        route: str | None,
        status: int,
        decision: str,
        client: str,
        seconds: float,
        upstream_seconds: float | None,
        waited_seconds: float = 0.0,
    ) -> None:
        """Count one finished API call."""
        key = (method, route or _NO_ROUTE, status, decision, client)
        counter = self._request_counters.get(key)
        if counter is None:
            label_method = method if method in METHOD_PERMISSIONS else "OTHER"
            counter = self._requests.labels(label_method, key[1], str(status), decision, client)
            if label_method == method:
                self._request_counters[key] = counter
        counter.inc()
        self._request_seconds.observe(seconds)
        if upstream_seconds is not None:
            self._upstream_seconds.observe(upstream_seconds)
        if waited_seconds:
            self._ratelimit_wait_seconds.observe(waited_seconds)

    def ratelimit_remaining(self, value: str | None) -> None:
        """Record InvoisX's X-RateLimit-Remaining header, when it sent a number."""
        if value is not None and value.isdigit():
            self._ratelimit_remaining.set(int(value))

    def upstream_auth_failure(self) -> None:
        """Count a token-level refusal from InvoisX."""
        self._auth_failures.inc()

    def token_reload(self, result: str) -> None:
        """Count a token file reload: `success`, `unchanged` or `error`."""
        self._reloads.labels(result).inc()

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
