"""Prometheus metrics of brski-registrar and brski-masa (``[metrics] listen``, ``--metrics``).

    brski_<program>_refusals_total{endpoint,reason}   refused TLS handshakes (endpoint "tls";
                                                      the CoAPS listener's DTLS ones: "dtls")
                                                      and refused requests (endpoint: the last
                                                      path segment, "unknown" for other paths;
                                                      CoAPS: the short name, e.g. "rv", "sen")
    brski_registrar_coaps_drops_total{reason}          datagrams the CoAPS (DTLS) socket dropped:
                                                      no-cookie, handshake-failed (e.g. an
                                                      unknown manufacturer), table-full, garbage
    brski_registrar_coaps_sessions                     DTLS sessions now open
    brski_<program>_event_loop_lag_seconds            histogram: how late the event loop ran
                                                      a timer due every 50 ms (a blocking
                                                      call in a handler shows here)

Reasons are short fixed labels (below), the words for humans go to the log. The TLS reasons
exist from the start, at zero, so a dashboard can tell "never happened" from "not exported".
Served by prometheus_client's HTTP server on a thread of its own, like joinproxyd's.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .tomlconfig import Table, parse_host_port

# The *_created series say when a process started counting: noise for an operator.
disable_created_metrics()

LOOP_LAG_INTERVAL = 0.05
LOOP_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TLS_ENDPOINT = "tls"
DTLS_ENDPOINT = "dtls"  # the CoAPS listener's handshakes, with the same reasons
TLS_REASONS = ("tls-unknown-ca", "tls-certificate-expired", "tls-certificate-not-yet-valid",
               "tls-bad-certificate", "tls-handshake-failed")

# HTTP status -> reason label, for refusals that name no reason of their own.
STATUS_REASONS = {
    400: "malformed", 401: "unauthenticated", 403: "forbidden", 404: "not-found",
    405: "method-not-allowed", 406: "not-acceptable", 413: "too-large",
    415: "wrong-media-type", 500: "internal-error", 502: "bad-masa-answer",
}


def status_reason(status: int) -> str:
    return STATUS_REASONS.get(status, f"status-{status}")


class ServiceMetrics:
    def __init__(self, program: str) -> None:
        self.registry = CollectorRegistry()
        self.refusals = Counter(
            f"brski_{program}_refusals", "Refused TLS handshakes and requests",
            ["endpoint", "reason"], registry=self.registry)
        for reason in TLS_REASONS:
            self.refusals.labels(TLS_ENDPOINT, reason)
        self.loop_lag = Histogram(
            f"brski_{program}_event_loop_lag_seconds",
            f"How late the event loop ran a timer due every {LOOP_LAG_INTERVAL * 1000:g} ms",
            buckets=LOOP_LAG_BUCKETS, registry=self.registry)
        self._server: tuple[Any, threading.Thread] | None = None

    async def watch_loop(self, interval: float = LOOP_LAG_INTERVAL) -> None:
        """Observe the event loop's lag until cancelled: a timer due every ``interval``
        seconds, and how late it ran."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.loop_lag.observe(max(0.0, loop.time() - due))

    def refused(self, endpoint: str, reason: str) -> None:
        self.refusals.labels(endpoint, reason).inc()

    def watch_dtls(self, endpoint: Any) -> None:
        """Export a ``coaps_io.endpoint.DtlsEndpoint``'s drop counters and session count, and
        its handshake refusal reasons at zero."""
        for reason in TLS_REASONS:
            self.refusals.labels(DTLS_ENDPOINT, reason)
        self.registry.register(_DtlsCollector(endpoint))

    def serve(self, host: str, port: int) -> None:
        """Serve /metrics over HTTP from a background thread."""
        self._server = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            server.server_close()
            thread.join(timeout=2)
            self._server = None


class _DtlsCollector:
    """Read at scrape time: the endpoint counts for itself (``drops``, ``peers``)."""

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint

    def collect(self) -> Any:
        drops = CounterMetricFamily("brski_registrar_coaps_drops",
                                    "Datagrams dropped by the CoAPS DTLS socket", labels=["reason"])
        for reason, count in sorted(self.endpoint.drops.items()):
            drops.add_metric([reason], count)
        yield drops
        yield GaugeMetricFamily("brski_registrar_coaps_sessions", "DTLS sessions open",
                                value=len(self.endpoint.peers))


def metrics_address(text: str) -> tuple[str, int] | None:
    """``[metrics] listen`` / ``--metrics``: "[ipv6]:port", "ipv4:port" or "" (off).
    ValueError with the reason."""
    if not text:
        return None
    host, port = parse_host_port(text)
    return host.strip("[]"), port


def load_metrics_listen(root: Table) -> tuple[str, int] | None:
    """The optional ``[metrics]`` table of both services' configuration files."""
    table = root.table("metrics")
    if table.data.get("listen") == "":
        del table.data["listen"]  # "" turns it off, as in joinproxyd's file (string() refuses it)
    text = table.string("listen", None) or ""
    try:
        address = metrics_address(text)
    except ValueError as exc:
        raise table.error("listen", f"{text!r}: {exc}") from exc
    table.finish()
    return address
