"""Reading and writing sysctls through /proc/sys, of the caller's network namespace.

/proc/sys/net is per network namespace (it shows the namespace of the process that reads
it), so the daemon running inside a namespace changes only that namespace: the lab relies
on this. ``root`` is injectable so tests can point it at a temporary directory.
"""

from pathlib import Path

from . import KernelError, describe_errno

PROC_SYS = Path("/proc/sys")

# Linux decides whether to forward an IPv6 packet by this knob alone (the per-interface
# copies are set from it when it is written); NAT66 cannot work without it.
IPV6_FORWARDING = "net.ipv6.conf.all.forwarding"


def _path(key: str, root: Path) -> Path:
    parts = key.split(".")
    if not key or any(not part or part in (".", "..") or "/" in part for part in parts):
        raise ValueError(f"not a sysctl key: {key!r}")
    return root.joinpath(*parts)


def read(key: str, root: Path = PROC_SYS) -> str:
    """The value as the kernel prints it, without the trailing newline."""
    try:
        return _path(key, root).read_text().strip()
    except OSError as exc:
        raise KernelError(f"cannot read {key}: {describe_errno(exc.errno or 0)}",
                          exc.errno) from None


def write(key: str, value: str, root: Path = PROC_SYS) -> None:
    try:
        _path(key, root).write_text(f"{value}\n")
    except OSError as exc:
        raise KernelError(f"cannot set {key}={value}: {describe_errno(exc.errno or 0)}",
                          exc.errno) from None
