"""Which registrar new circuits go to: every known registrar, its health, and the choice.

Registrars come from the configuration (static) and from discovery on the backbone (GRASP
floods, mDNS). Each one is probed with a TCP connect every health interval; the active one is
the first healthy registrar by (preference, static before discovered, order learned). When it
stops answering the next healthy one takes over, and when a more preferred one answers again
it takes back over, so circuits go to the registrar the operator ranked first whenever it can.

:class:`RegistrarTable` (registry.py) holds all of that as plain data with time passed in,
so tests drive it with a fake clock; :class:`RegistrarSet` here is the asyncio adapter that
probes, expires, and tells the control plane when the active registrar changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..aio import cancel_and_wait, woken_or_timeout
from ..metrics import Metrics
from ..model import RegistrarEndpoint
from .registry import (
    DISCOVERED_PREFERENCE,
    Key,
    RegistrarState,
    RegistrarTable,
    endpoint_key,
)

__all__ = ["DISCOVERED_PREFERENCE", "RegistrarSet", "RegistrarTable", "endpoint_key",
           "tcp_probe"]

Probe = Callable[[RegistrarEndpoint, float], Awaitable[str | None]]


async def tcp_probe(endpoint: RegistrarEndpoint, timeout: float) -> str | None:
    """Connect and close: None if the registrar accepted, else why not. A link-local
    registrar is reached through its scope_id (the backbone's ifindex)."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, endpoint.sockaddr)
        except TimeoutError:
            return f"no answer within {timeout:g} s"
        except OSError as exc:
            # asyncio words it "Connect call failed (...)"; the errno says what happened.
            return os.strerror(exc.errno) if exc.errno else str(exc)
    return None


class RegistrarSet:
    """The asyncio side of :class:`RegistrarTable`: probes, expiry and change callbacks.

    ``on_change`` is called on the event loop whenever the active registrar changes,
    including to None, and never otherwise. ``active`` is always what it was last told.
    """

    def __init__(self, *, static: Sequence[RegistrarEndpoint], health_interval: float,
                 health_timeout: float, metrics: Metrics, log: logging.Logger,
                 on_change: Callable[[RegistrarEndpoint | None], None],
                 discovered_preference: int = DISCOVERED_PREFERENCE,
                 clock: Callable[[], float] = time.monotonic,
                 probe: Probe = tcp_probe) -> None:
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.metrics = metrics
        self.log = log
        self.on_change = on_change
        self._clock = clock
        self._probe = probe
        self._table = RegistrarTable(discovered_preference)
        self._labels: dict[Key, tuple[str, str]] = {}  # key -> (registrar, source) exported
        self._active: RegistrarEndpoint | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._table.set_static(static)
        for state in self._table.states():
            self._export(state)

    # -- inputs from the control plane and discovery -------------------------------------------
    def offer(self, endpoint: RegistrarEndpoint, ttl_seconds: float | None) -> None:
        if ttl_seconds is not None and ttl_seconds <= 0:
            self.withdraw(endpoint)
            return
        state, new = self._table.offer(endpoint, ttl_seconds, self._clock())
        assert state is not None  # only a ttl <= 0 forgets, and that was handled above
        if new:
            self.log.info("registrar %s learned from %s", state.endpoint.key, endpoint.source,
                          extra={"REGISTRAR": state.endpoint.key})
        self._export(state)
        self._changed()

    def withdraw(self, endpoint: RegistrarEndpoint) -> None:
        gone = self._table.withdraw(endpoint)
        if gone is not None:
            self._forgotten([gone], f"withdrawn by {endpoint.source}")
        else:
            state = self._table.get(endpoint)
            if state is not None:
                self._export(state)
        self._changed()

    def reconfigure(self, static: Sequence[RegistrarEndpoint], health_interval: float,
                    health_timeout: float) -> None:
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self._forgotten(self._table.set_static(static), "no longer configured")
        self._table.reschedule(self._clock(), health_interval)
        for state in self._table.states():
            self._export(state)
        self._changed()

    # -- life cycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="registrar-health")

    async def stop(self) -> None:
        """Stop probing. Nobody is told about a last change: the daemon is going away."""
        await cancel_and_wait(self._task)
        self._task = None

    # -- views ---------------------------------------------------------------------------------
    @property
    def active(self) -> RegistrarEndpoint | None:
        return self._active

    def status(self) -> list[dict[str, Any]]:
        now, wall = self._clock(), time.time()
        out = []
        for state in self._table.states():
            expiry = state.expiry()
            out.append({
                "address": state.endpoint.address,
                "port": state.endpoint.port,
                "coaps_port": state.endpoint.coaps_port,  # None: no CoAPS (coaps mode)
                "scope_id": state.endpoint.scope_id,
                "source": state.endpoint.source,
                "sources": list(state.sources),
                "preference": state.endpoint.preference,
                "healthy": state.healthy,
                "last_probe": None if state.last_probe is None
                else wall - (now - state.last_probe),
                "last_error": state.last_error,
                "expires_in": None if expiry is None else max(0.0, expiry - now),
                "active": self._active is not None
                and endpoint_key(self._active) == state.key,
            })
        return out

    # -- the probe loop ------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            self._wake.clear()  # a wake-up that comes during this pass is kept for the next
            try:
                await self._pass()
            except Exception:  # our bug: say so, and keep checking rather than go silent
                self.log.exception("registrar health pass failed")
                await asyncio.sleep(1)
                continue
            deadline = self._table.next_deadline()
            timeout_s = None if deadline is None else max(0.0, deadline - self._clock())
            await woken_or_timeout(self._wake, timeout_s)

    async def _pass(self) -> None:
        self._sweep()
        due = self._table.due(self._clock())
        if due:
            timeout, interval = self.health_timeout, self.health_interval
            errors = await asyncio.gather(*(self._probe_safely(s, timeout) for s in due))
            now = self._clock()
            for state, error in zip(due, errors, strict=True):
                self._record(state, error, now, interval)
            self._reselect()

    async def _probe_safely(self, state: RegistrarState, timeout: float) -> str | None:
        try:
            return await self._probe(state.endpoint, timeout)
        except Exception as exc:  # a probe bug must not end health checking for everyone
            self.log.exception("health probe of %s failed", state.endpoint.key)
            return f"probe failed: {exc}"

    def _record(self, state: RegistrarState, error: str | None, now: float,
                interval: float) -> None:
        if self._table.get(state.endpoint) is not state:
            return  # forgotten (or replaced) while its probe was in flight
        key = state.endpoint.key
        if self._table.probed(state, error, now, interval):
            if error is None:
                self.log.info("registrar %s answers", key, extra={"REGISTRAR": key})
            else:
                self.log.info("registrar %s is down: %s", key, error, extra={"REGISTRAR": key})
        else:
            self.log.debug("registrar %s probe: %s", key, error or "ok")
        self._export(state)

    def _sweep(self) -> None:
        self._forgotten(self._table.expire(self._clock()), "its announcement expired")

    def _changed(self) -> None:
        """Something was added, withdrawn or reconfigured: reselect now, probe soon."""
        self._sweep()
        self._reselect()
        self._wake.set()

    def _reselect(self) -> None:
        chosen = self._table.select()
        endpoint = chosen.endpoint if chosen is not None else None
        for state in self._table.states():
            self.metrics.registrar_active.labels(state.endpoint.key).set(
                1 if state is chosen else 0)
        if _same(endpoint, self._active) and \
                (endpoint.ipip if endpoint else None) == \
                (self._active.ipip if self._active else None):
            # Same registrar, same IPIP offer: keep the freshest view of it. (A changed IPIP
            # offer is news for the ipip mode and the announcements, so it is passed on.)
            self._active = endpoint
            return
        self._active = endpoint
        try:
            self.on_change(endpoint)
        except Exception:  # the control plane's bug must not stop health checking
            self.log.exception("registrar change handler failed")

    # -- metrics -------------------------------------------------------------------------------
    def _export(self, state: RegistrarState) -> None:
        key = state.key
        labels = (state.endpoint.key, state.endpoint.source)
        old = self._labels.get(key)
        if old is not None and old != labels:
            with contextlib.suppress(KeyError):
                self.metrics.registrar_up.remove(*old)
        self._labels[key] = labels
        self.metrics.registrar_up.labels(*labels).set(1 if state.healthy else 0)

    def _forgotten(self, states: Sequence[RegistrarState], why: str = "") -> None:
        for state in states:
            self.log.info("registrar %s forgotten: %s", state.endpoint.key, why,
                          extra={"REGISTRAR": state.endpoint.key})
            labels = self._labels.pop(state.key, None)
            with contextlib.suppress(KeyError):
                if labels is not None:
                    self.metrics.registrar_up.remove(*labels)
                self.metrics.registrar_active.remove(state.endpoint.key)


def _same(a: RegistrarEndpoint | None, b: RegistrarEndpoint | None) -> bool:
    if a is None or b is None:
        return a is b
    return endpoint_key(a) == endpoint_key(b)
