"""Stand-ins for the constrained discovery parts on a system without their libraries.

CoRE discovery and the DTLS probe need aiocoap, pyOpenSSL and cryptography; an OpenWrt
router that serves only circuit (or nat66, ipip) pledges has none of them and must start
(optional capabilities are optional: kernel/features.py). There these stand-ins take the
places of ConstrainedDiscovery and JoinPortAnnouncer: nothing is discovered or answered, and
status says why. A configuration with a constrained mode never gets here: the start (and a
reload) is refused first, naming the missing package.
"""

from __future__ import annotations

from typing import Any

from ..model import RegistrarEndpoint


class NoConstrainedDiscovery:
    chosen: RegistrarEndpoint | None = None

    def __init__(self, missing: str) -> None:
        self.missing = missing

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def reconfigure(self, *args: Any, **kwargs: Any) -> None:
        return None

    def endpoint_for(self, kind: str) -> RegistrarEndpoint | None:
        return None

    def grasp_flood(self, flood: Any, ifindex: int) -> int:
        return 0  # its UDP locators are of no use without a constrained mode

    async def reconcile_backbone(self, *args: Any, **kwargs: Any) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {"endpoints": [], "unavailable": self.missing}


class NoJoinPortAnnouncer:
    serving = False

    def __init__(self, missing: str) -> None:
        self.missing = missing

    async def set_targets(self, targets: Any) -> None:
        return None

    async def stop(self) -> None:
        return None

    def status(self) -> dict[str, object]:
        return {"serving": False, "error": self.missing, "answered": 0, "unparsable": 0,
                "links": []}
