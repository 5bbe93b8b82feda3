"""The registrar table: every known registrar, where it came from, its health, the choice.

Plain data with time passed in, so unit tests drive it with a fake clock; registrars.py is
the asyncio adapter that probes and tells the control plane. The rule: the active registrar
is the first healthy one by (preference, configured before discovered, order learned).
"""


from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Final

from ..model import IpipTarget, RegistrarEndpoint

# Static preferences are 0..65535 (config.py), so this ranks every discovered registrar after
# every configured one. A RegistrarSet can be given another value to rank them differently.
DISCOVERED_PREFERENCE: Final = 65536
STATIC: Final = "static"

# (address, port, scope_id): one registrar however many ways it was learned.
Key = tuple[str, int, int]


def endpoint_key(endpoint: RegistrarEndpoint) -> Key:
    address = ipaddress.IPv6Address(endpoint.address.split("%")[0])
    scope = endpoint.scope_id if address.is_link_local else 0
    return (address.compressed, endpoint.port, scope)


@dataclass
class RegistrarState:
    """One registrar: where it is, who told us about it, and what its last probe said."""

    endpoint: RegistrarEndpoint  # normalised address; preference and source are effective
    seq: int  # order learned: ties on preference go to the registrar known longest
    static_preference: int | None = None  # set while the configuration lists it
    learned: dict[str, float | None] = field(default_factory=dict)  # source -> expiry
    healthy: bool | None = None  # None until the first probe has answered
    last_probe: float | None = None  # clock() when the last probe finished
    last_error: str | None = None
    next_probe: float = 0.0  # 0: probe as soon as possible
    # What each source says about IPIP (static configuration, a GRASP flood); the endpoint
    # carries the configuration's when it has one, else a discovery source's.
    ipip: dict[str, IpipTarget | None] = field(default_factory=dict)
    coaps_port: dict[str, int | None] = field(default_factory=dict)  # per source, likewise

    @property
    def key(self) -> Key:
        return endpoint_key(self.endpoint)

    @property
    def static(self) -> bool:
        return self.static_preference is not None

    @property
    def sources(self) -> tuple[str, ...]:
        return ((STATIC,) if self.static else ()) + tuple(self.learned)

    @property
    def rank(self) -> tuple[int, int, int]:
        return (self.endpoint.preference, 0 if self.static else 1, self.seq)

    def expiry(self) -> float | None:
        """When the last discovered source lapses (None: never, while static or untimed)."""
        if self.static or any(t is None for t in self.learned.values()):
            return None
        return max((t for t in self.learned.values() if t is not None), default=None)


class RegistrarTable:
    """The registrars and the selection rule, with no I/O and no clock of its own."""

    def __init__(self, discovered_preference: int = DISCOVERED_PREFERENCE) -> None:
        self.discovered_preference = discovered_preference
        self._states: dict[Key, RegistrarState] = {}
        self._seq = 0

    # -- what we know -------------------------------------------------------------------------
    def states(self) -> list[RegistrarState]:
        return sorted(self._states.values(), key=lambda s: s.rank)

    def get(self, endpoint: RegistrarEndpoint) -> RegistrarState | None:
        return self._states.get(endpoint_key(endpoint))

    def _state_for(self, endpoint: RegistrarEndpoint) -> RegistrarState:
        key = endpoint_key(endpoint)
        state = self._states.get(key)
        if state is None:
            self._seq += 1
            normalised = replace(endpoint, address=key[0], scope_id=key[2])
            state = self._states[key] = RegistrarState(normalised, self._seq)
        return state

    def _refresh(self, state: RegistrarState) -> None:
        """Recompute the effective preference and source label after origins changed."""
        if state.static_preference is not None:
            preference, source = state.static_preference, STATIC
        else:
            preference = self.discovered_preference
            source = next(iter(state.learned), state.endpoint.source)
        origins = ([STATIC] if state.static else []) + list(state.learned)
        ipip = next((t for s in origins if (t := state.ipip.get(s)) is not None), None)
        coaps = next((p for s in origins if (p := state.coaps_port.get(s)) is not None), None)
        state.endpoint = replace(state.endpoint, preference=preference, source=source,
                                 ipip=ipip, coaps_port=coaps)

    def _drop_if_orphan(self, state: RegistrarState) -> bool:
        if state.static or state.learned:
            return False
        self._states.pop(state.key, None)
        return True

    # -- changes ------------------------------------------------------------------------------
    def set_static(self, endpoints: Sequence[RegistrarEndpoint]) -> list[RegistrarState]:
        """Make the static set exactly `endpoints`; returns the states forgotten."""
        wanted = {endpoint_key(e): e for e in endpoints}
        removed = []
        for state in list(self._states.values()):
            if state.static and state.key not in wanted:
                state.static_preference = None
                if self._drop_if_orphan(state):
                    removed.append(state)
                else:
                    self._refresh(state)
        for endpoint in wanted.values():
            state = self._state_for(endpoint)
            state.static_preference = endpoint.preference
            state.ipip[STATIC] = endpoint.ipip
            state.coaps_port[STATIC] = endpoint.coaps_port
            self._refresh(state)
        return removed

    def offer(self, endpoint: RegistrarEndpoint, ttl: float | None, now: float,
              ) -> tuple[RegistrarState | None, bool]:
        """A discovery source vouches for `endpoint` for `ttl` seconds (None: until withdrawn).
        A ttl of zero or less withdraws it (a GRASP flood with ttl 0 means "no longer valid").
        Returns the state (None if forgotten) and whether it is new."""
        if ttl is not None and ttl <= 0:
            return None if self.withdraw(endpoint) else self.get(endpoint), False
        new = self.get(endpoint) is None
        state = self._state_for(endpoint)
        state.learned[endpoint.source] = None if ttl is None else now + ttl
        state.ipip[endpoint.source] = endpoint.ipip
        state.coaps_port[endpoint.source] = endpoint.coaps_port
        self._refresh(state)
        return state, new

    def withdraw(self, endpoint: RegistrarEndpoint) -> RegistrarState | None:
        """The source of `endpoint` no longer vouches for it; returns the state if forgotten."""
        state = self.get(endpoint)
        if state is None:
            return None
        if endpoint.source == STATIC:
            state.static_preference = None
        state.learned.pop(endpoint.source, None)
        if self._drop_if_orphan(state):
            return state
        self._refresh(state)
        return None

    def expire(self, now: float) -> list[RegistrarState]:
        """Drop discovered sources whose ttl has run out; returns the states forgotten."""
        removed = []
        for state in list(self._states.values()):
            lapsed = [s for s, t in state.learned.items() if t is not None and t <= now]
            if not lapsed:
                continue
            for source in lapsed:
                del state.learned[source]
            if self._drop_if_orphan(state):
                removed.append(state)
            else:
                self._refresh(state)
        return removed

    # -- health and choice --------------------------------------------------------------------
    def due(self, now: float) -> list[RegistrarState]:
        return [s for s in self.states() if s.next_probe <= now]

    def probed(self, state: RegistrarState, error: str | None, now: float,
               interval: float) -> bool:
        """Record a probe result (error None: it answered); True if its health changed."""
        changed = state.healthy is not (error is None)
        state.healthy = error is None
        state.last_error = error
        state.last_probe = now
        state.next_probe = now + interval
        return changed

    def reschedule(self, now: float, interval: float) -> None:
        """A new health interval: nobody waits longer than it for their next probe."""
        for state in self._states.values():
            state.next_probe = min(state.next_probe, now + interval)

    def select(self) -> RegistrarState | None:
        return next((s for s in self.states() if s.healthy), None)

    def next_deadline(self) -> float | None:
        """The earliest time something is due: a probe or an expiry."""
        times = [s.next_probe for s in self._states.values()]
        times += [t for s in self._states.values() for t in s.learned.values() if t is not None]
        return min(times, default=None)
