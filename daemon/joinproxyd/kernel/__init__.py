"""Everything joinproxyd asks of the kernel, in one package (habit 11).

    netlink.py   links and addresses, watched over rtnetlink (pyroute2's asyncio API)
    nftables.py  the one nftables table the daemon owns (libnftables JSON)
    sysctl.py    /proc/sys knobs (IPv6 forwarding for NAT66)
    bpf.py       the BPF data plane's owner (BpfDatapath), built from bpf_layout.py (shapes
                 shared with ebpf/joinproxy.h), libbpf.py (the ctypes binding),
                 bpf_object.py (loading and pinning) and bpf_attach.py (XDP/tc over netlink)

No other module of the daemon imports pyroute2 or nftables or writes /proc/sys; relay modes
describe what they want and call in here. Failures surface as KernelError, whose message
names the operation and, where the kernel gave one, the errno by name.
"""

import errno as _errno
import os


class KernelError(Exception):
    """The kernel (or libnftables) refused or failed an operation.

    ``errno`` is the kernel's error number when there is one, so callers decide by errno and
    never by message text; str() is the one line an operator needs.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def describe_errno(code: int) -> str:
    """'EPERM (Operation not permitted)': the symbolic name first, for grepping logs."""
    name = _errno.errorcode.get(code, f"errno {code}")
    return f"{name} ({os.strerror(code)})"
