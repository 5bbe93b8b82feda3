"""The registrar's state, shared by its request handlers (``brski_handlers``, ``est``)."""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web
from cryptography import x509

from .config import RegistrarConfig
from .domain_ca import DomainCA
from .identity import Client, classify, peer_chain
from .masa_client import MasaClient
from .store import Store
from .store_commit import GroupCommitter
from .voucher_request import PledgeRequest
from .web import Refusal

T = TypeVar("T")


@dataclass
class Registrar:
    config: RegistrarConfig
    store: Store
    masa: MasaClient
    ca: DomainCA
    # The request handlers' writes go through it when set (registrar.store_commit): durable
    # before the answer as ever, but off the event loop and several to one commit.
    committer: GroupCommitter | None = None

    async def write(self, job: Callable[[Store], T]) -> T:
        """``job(store)``'s result once its writes are committed; ``job`` must only touch
        the store it is given (it may run twice, see ``store_commit``)."""
        if self.committer is None:
            with self.store.transaction():
                return job(self.store)
        return await self.committer.run(job)

    async def record_voucher_request(
            self, req: PledgeRequest, idevid: bytes, rvr: bytes,
    ) -> tuple[int, Callable[[str, str], Awaitable[None]]]:
        """Record a pledge's voucher request as pending (HTTPS and CoAPS alike) and return
        its id and how to set its status later."""
        def record(store: Store) -> int:
            store.pledge_seen(req.serial, idevid, "voucher-requested")
            # One record per pledge request across the domain's registrars (a retry may land
            # on another).
            return store.find_or_add_voucher_request(req.serial, req.sha256, req.signed, rvr,
                                                     req.nonce_text, "pending")

        request_id = await self.write(record)

        async def update(status: str, reason: str) -> None:
            await self.write(lambda s: s.update_voucher_request(request_id, status, reason))

        return request_id, update

    @staticmethod
    def now() -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC)

    @property
    def rvr_certificates(self) -> list[x509.Certificate]:
        """The chain the RVR carries: the MASA pins the top of it (RFC 8995 §5.5), so the
        domain CA is added when the TLS certificate file holds only the leaf."""
        chain = list(self.config.tls_chain)
        if self.config.ca_cert not in chain:
            chain.append(self.config.ca_cert)
        return chain

    def client(self, request: web.Request) -> Client | None:
        return classify(peer_chain(request), self.config.manufacturer_cas, self.config.ca_cert,
                        self.now())

    def check_enrollment_policy(self, serial: str) -> None:
        """403 unless policy lets this device join (``[pledges] enroll``)."""
        if self.config.enroll == "allowlist" and serial not in self.config.serials:
            raise Refusal(403, f"device {serial} is not on this registrar's allowlist")


REGISTRAR: web.AppKey[Registrar] = web.AppKey("registrar", Registrar)
