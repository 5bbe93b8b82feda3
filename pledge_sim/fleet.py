"""Many pledges in one process, at most ``concurrency`` enrolling at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from .discovery import Candidate
from .identity import PledgeIdentity
from .runner import EnrollResult, PledgeRunner, Settings


class Enrolls(Protocol):
    """One pledge's runner: PledgeRunner (HTTPS) or coaps_runner.CoapsPledgeRunner."""

    def run(self) -> Awaitable[EnrollResult]: ...


Runner = Callable[[PledgeIdentity, Sequence[Candidate], Settings], Enrolls]


async def enroll_all(identities: Sequence[PledgeIdentity], candidates: Sequence[Candidate],
                     settings: Settings, concurrency: int,
                     runner: Runner = PledgeRunner) -> list[EnrollResult]:
    """Results in the order of ``identities``; a pledge's seconds start when it starts.
    ``runner``: the transport's runner class (HTTPS by default)."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    gate = asyncio.Semaphore(concurrency)

    async def one(identity: PledgeIdentity) -> EnrollResult:
        async with gate:
            return await runner(identity, candidates, settings).run()

    return list(await asyncio.gather(*(one(i) for i in identities)))
