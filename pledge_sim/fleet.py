"""Many pledges in one process, at most ``concurrency`` enrolling at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from .discovery import Candidate
from .identity import PledgeIdentity
from .runner import EnrollResult, PledgeRunner, Settings


async def enroll_all(identities: Sequence[PledgeIdentity], candidates: Sequence[Candidate],
                     settings: Settings, concurrency: int) -> list[EnrollResult]:
    """Results in the order of ``identities``; a pledge's seconds start when it starts."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    gate = asyncio.Semaphore(concurrency)

    async def one(identity: PledgeIdentity) -> EnrollResult:
        async with gate:
            return await PledgeRunner(identity, candidates, settings).run()

    return list(await asyncio.gather(*(one(i) for i in identities)))
