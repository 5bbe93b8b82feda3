"""An OSCORE security context that lives in memory only: one derived by EDHOC.

Its keys exist for one EDHOC session and die with the process, so its sequence number and
replay window need no persistence (a restart means a new handshake and new keys: no nonce can
repeat under a key). aiocoap does the OSCORE itself (RFC 8613 vectors:
tests/test_oscore_vectors.py); this class only fills in the parameters. Both the JRC
(registrar.cojp_edhoc) and the pledge (pledge_sim.cojp) use it.
"""

from __future__ import annotations

from aiocoap import oscore
from cryptography.hazmat.primitives import hashes

AEAD = "AES-CCM-16-64-128"  # EDHOC cipher suite 2's application AEAD
REPLAY_WINDOW = 32


class EphemeralOscoreContext(oscore.CanProtect, oscore.CanUnprotect, oscore.SecurityContextUtils):
    echo_recovery = None  # the window starts empty with the keys: no RFC 9175 Echo round

    def __init__(self, sender_id: bytes, recipient_id: bytes, master_secret: bytes,
                 master_salt: bytes, id_context: bytes | None = None) -> None:
        self.sender_id = sender_id
        self.recipient_id = recipient_id
        self.id_context = id_context
        self.alg_aead = oscore.algorithms[AEAD]
        self.hashfun = hashes.SHA256()
        self.derive_keys(master_salt, master_secret)
        self.sender_sequence_number = 0
        self.recipient_replay_window = oscore.ReplayWindow(REPLAY_WINDOW, lambda: None)
        self.recipient_replay_window.initialize_empty()

    def post_seqnoincrease(self) -> None:
        pass  # nothing to persist: see the module docstring
