"""Prometheus metrics: what an operator watches, served at `/metrics`.

Labels carry only bounded, non-secret values: the templated route (never a raw id), the method
(unknown ones folded into `OTHER`), the status, the decision and the client's name. The token
appears only as its fingerprint.

What every API call updates is plain counting in the event loop's thread (`_Calls`), handed
to prometheus-client as metric families when scraped: its thread-safe metric objects take a
lock per update, which cost several microseconds on every call (bench/README.md).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy.config.credentials import TokenHolder
from proxy.stages.policy import METHOD_PERMISSIONS
from proxy.stages.ratelimit import header_number

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
# From a fast local answer to InvoisX's slowest document submissions.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BUCKET_LABELS = (*map(floatToGoString, _BUCKETS), "+Inf")  # as prometheus-client writes them
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


class _Histogram:
    """Observations counted into `_BUCKETS`, as a histogram family shows them."""

    __slots__ = ("_counts", "_sum", "documentation", "name")

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self._counts = [0] * (len(_BUCKETS) + 1)  # the last one is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(_BUCKETS, value)] += 1
        self._sum += value

    def family(self) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, count in zip(_BUCKET_LABELS, self._counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        return HistogramMetricFamily(
            self.name, self.documentation, buckets=buckets, sum_value=self._sum
        )


class _Calls(Collector):
    """What every API call updates: its outcome, its durations, InvoisX's remaining calls."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str, str, str], int] = {}
        self.request_seconds = _Histogram(
            "invoisx_proxy_request_duration_seconds", "Whole API calls through the proxy."
        )
        self.upstream_seconds = _Histogram(
            "invoisx_proxy_upstream_duration_seconds", "Time until InvoisX's response headers."
        )
        self.ratelimit_wait_seconds = _Histogram(
            "invoisx_proxy_ratelimit_wait_seconds",
            "Time calls waited in the local rate-limit queue (calls that waited at all).",
        )
        self.ratelimit_remaining: int | None = None
        # Shown only with a shared state store (INVOISX_PROXY_REDIS_URL).
        self.state_store_up: bool | None = None
        self.state_store_proxies: int | None = None

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "invoisx_proxy_requests",
            "API calls answered, by outcome.",
            labels=["method", "route", "status", "decision", "client"],
        )
        for labels, count in self.counts.items():
            requests.add_metric(labels, count)
        yield requests
        yield self.request_seconds.family()
        yield self.upstream_seconds.family()
        yield self.ratelimit_wait_seconds.family()
        if self.ratelimit_remaining is not None:
            yield GaugeMetricFamily(
                "invoisx_proxy_upstream_ratelimit_remaining",
                "InvoisX's X-RateLimit-Remaining on its latest response.",
                value=self.ratelimit_remaining,
            )
        if self.state_store_up is not None:
            yield GaugeMetricFamily(
                "invoisx_proxy_state_store_up",
                "1 while the shared state store (Redis) answers, 0 while the proxy runs apart.",
                value=int(self.state_store_up),
            )
        if self.state_store_proxies is not None:
            yield GaugeMetricFamily(
                "invoisx_proxy_state_store_proxies",
                "Proxies sharing the token's budget, as of the latest heartbeat.",
                value=self.state_store_proxies,
            )


class Metrics:
    """The proxy's metrics in a registry of its own (never the process-global one).

    The per-call updates are not thread-safe: they come from the event loop's thread only.
    """

    def __init__(self, holder: TokenHolder) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_TokenCollector(holder))
        self._calls = _Calls()
        self.registry.register(self._calls)
        self._reloads = Counter(
            "invoisx_proxy_token_reloads",
            "Token file reloads, by result.",
            ["result"],
            registry=self.registry,
        )
        self._auth_failures = Counter(
            "invoisx_proxy_upstream_auth_failures",
            "InvoisX refused the token itself (401/403 with a token-level error code).",
            registry=self.registry,
        )
        self._scrubbed = Counter(
            "invoisx_proxy_token_scrubbed",
            "Times the token was kept out of an answer, by where (header dropped, body masked).",
            ["where"],
            registry=self.registry,
        )
        # Shown at 0 from the start, so alerts can use rate().
        for result in ("success", "unchanged", "error"):
            self._reloads.labels(result)
        for where in ("header", "body"):
            self._scrubbed.labels(where)

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
        calls = self._calls
        label_method = method if method in METHOD_PERMISSIONS else "OTHER"
        key = (label_method, route or _NO_ROUTE, str(status), decision, client)
        calls.counts[key] = calls.counts.get(key, 0) + 1
        calls.request_seconds.observe(seconds)
        if upstream_seconds is not None:
            calls.upstream_seconds.observe(upstream_seconds)
        if waited_seconds:
            calls.ratelimit_wait_seconds.observe(waited_seconds)

    def ratelimit_remaining(self, value: bytes | None) -> None:
        """Record InvoisX's X-RateLimit-Remaining header, when it sent a number."""
        remaining = header_number(value)
        if remaining is not None:
            self._calls.ratelimit_remaining = remaining

    def state_store_up(self, up: bool) -> None:
        """Record whether the shared state store answers."""
        self._calls.state_store_up = up

    def state_store_proxies(self, count: int) -> None:
        """Record how many proxies share the budget."""
        self._calls.state_store_proxies = count

    def upstream_auth_failure(self) -> None:
        """Count a token-level refusal from InvoisX."""
        self._auth_failures.inc()

    def token_scrubbed(self, where: str, count: int) -> None:
        """Count secrets kept out of an answer: `header` (dropped) or `body` (masked)."""
        self._scrubbed.labels(where).inc(count)

    def token_reload(self, result: str) -> None:
        """Count a token file reload: `success`, `unchanged` or `error`."""
        self._reloads.labels(result).inc()

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
