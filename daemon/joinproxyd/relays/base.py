"""The one small interface every relay mode implements.

The control plane owns the desired state: which join interfaces are served by which mode,
and which registrar is active. Whenever any of it changes it calls ``reconcile`` on each mode
with the full desired state for that mode; the mode makes its sockets or kernel rules match,
idempotently. New modes (CoAPS, JPY, IPIP, CoJP) plug in by subclassing RelayMode and adding
their name to the registry in relays/__init__.py; the core does not change.
"""

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import CircuitSettings, CojpSettings, IpipSettings, JpySettings, Limits
from ..datapath import Datapath
from ..listeners import Listeners
from ..metrics import Metrics
from ..model import JoinInterface, LinkState, RegistrarEndpoint
from ..window import RefusalLog

REFUSAL_LOG_SECONDS = 10.0  # one log line per peer and reason per this long (still counted)
REFUSAL_LOG_KEYS = 4096  # peers remembered before the quiet ones are forgotten


class RefusalSayer:
    """Logs a datagram relay's refusal once per (who, reason) per REFUSAL_LOG_SECONDS: a
    pledge retransmits and a forger repeats, and every datagram is counted anyway, so the
    journal says who and why once per episode instead of once per packet."""

    def __init__(self, log: logging.Logger, mode: str,
                 seconds: float = REFUSAL_LOG_SECONDS) -> None:
        self.log = log
        self.mode = mode
        self.seconds = seconds
        self._logged: dict[tuple[str, str], float] = {}

    def __call__(self, who: str, reason: str, interface: str | None, text: str,
                 who_field: str = "PLEDGE") -> bool:
        """Log ``text`` unless (who, reason) was logged lately; True if it was logged.
        ``who_field`` is the journal field naming who: PLEDGE, or REGISTRAR for what came
        from the backbone side."""
        now = time.monotonic()
        key = (who, reason)
        if now - self._logged.get(key, -self.seconds) < self.seconds:
            return False
        self._logged[key] = now
        if len(self._logged) > REFUSAL_LOG_KEYS:
            self._logged = {k: t for k, t in self._logged.items() if now - t < self.seconds}
        extra = {"MODE": self.mode, who_field: who, "REASON": reason}
        if interface is not None:
            extra["INTERFACE"] = interface
        self.log.info("%s", text, extra=extra)
        return True


def _always_open() -> bool:
    return True


@dataclass
class RelayContext:
    """What a relay mode may read from the control plane (it writes only its counters)."""

    metrics: Metrics
    limits: Callable[[], Limits]
    backbone: Callable[[], LinkState | None]
    log: logging.Logger
    # The BPF data plane, opened by whoever first needs it (modes that run in BPF).
    datapath: Datapath | None = None
    ipip: Callable[[], IpipSettings] = IpipSettings
    cojp: Callable[[], CojpSettings] = CojpSettings
    jpy: Callable[[], JpySettings] = JpySettings
    circuit: Callable[[], CircuitSettings] = CircuitSettings
    # Bind failures and their retries (the control plane's, so that status, READY and the
    # announcements know what is really bound); a mode without one keeps its own.
    listeners: Listeners | None = None
    # The operator's join window (window.py): closed, new pledges are refused while what is
    # established stays. Refusals with a pledge address go to the ring `joinproxyctl
    # refusals` lists, besides their counter.
    join_window: Callable[[], bool] = _always_open
    refusals: RefusalLog = field(default_factory=RefusalLog)

    def listener_book(self) -> Listeners:
        if self.listeners is None:
            self.listeners = Listeners(self.metrics, self.log)
        return self.listeners


class RelayMode(ABC):
    name: ClassVar[str]
    # Which pledge source addresses the mode can serve, so the control plane knows which of
    # the join link's addresses to announce.
    serves_link_local: ClassVar[bool] = True
    serves_routable: ClassVar[bool] = False
    # Whether the mode has flows to count in joinproxyd_circuits_total and
    # joinproxyd_relayed_bytes_total (a stateless relay counts packets in BPF instead).
    keeps_flows: ClassVar[bool] = True
    # Whether it knows its open flows (joinproxyd_circuits_active): nat66's live in conntrack,
    # which it counts only as they start.
    counts_active: ClassVar[bool] = True
    # Whether pledges reach the mode by CoAPS (coaps, jpy): its join links then answer CoRE
    # join-port discovery (discovery/coap_join.py) while joining is open.
    constrained: ClassVar[bool] = False
    # A constrained mode's port on the registrar endpoint (RegistrarEndpoint.coaps_port or
    # .jpy_port): which registrar the control plane hands it (daemon.constrained_target).
    registrar_port: ClassVar[str] = ""

    @classmethod
    async def clean_leftovers(cls, log: logging.Logger) -> None:
        """Remove kernel state an earlier, killed run of this mode left behind, when the mode
        is not configured now (a configured mode replaces its own state on reconcile)."""
        return None  # most modes leave nothing in the kernel

    def __init__(self, ctx: RelayContext) -> None:
        self.ctx = ctx

    def forget_listener_failures(self, desired: Collection[str]) -> None:
        """A link this mode no longer serves takes its bind failures (status, metrics) along."""
        book = self.ctx.listener_book()
        for name, mode in list(book.failures):
            if mode == self.name and name not in desired:
                book.forget(name, mode)

    @abstractmethod
    async def reconcile(self, interfaces: Sequence[JoinInterface],
                        registrar: RegistrarEndpoint | None) -> None:
        """Serve exactly these interfaces, relaying to this registrar (None: refuse)."""

    def limits_changed(self) -> None:  # noqa: B027 - optional hook, most modes need nothing
        """Limits were reloaded; modes that cache them refresh here."""

    @abstractmethod
    async def close(self, drain_seconds: float) -> None:
        """Stop accepting, give open relays up to drain_seconds, remove all kernel state."""

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """A JSON-ready view for joinproxyctl."""

    def unserved(self) -> dict[str, str]:
        """The links this mode was asked to serve but does not serve now, with why (a
        listener that could not bind, say). Announcements, READY and status leave them out."""
        return {}

    def kernel_drops(self) -> dict[str, int]:
        """Drops counted by the kernel (nft or BPF counters), by DropReason value; read at
        scrape time, so it must be cheap and thread-safe."""
        return {}

    def circuits(self) -> list[dict[str, Any]]:
        """Open relayed connections, for `joinproxyctl circuits`."""
        return []

    def sync_counters(self) -> None:  # noqa: B027 - optional hook, most count in place
        """Move counts kept in place by a hot path into the metrics now (status reads them);
        called on the event loop."""
