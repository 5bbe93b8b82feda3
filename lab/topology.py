"""Namespace topologies for tests, benchmarks and the demo.

    pledge0 ─┐                                    ┌─ registrar0
    pledge1 ─┼─ [join link 0] ─ join0 ┐      ┌ bb0 ─ [backbone] ┼─ registrar1
    ...     ─┘                        proxy ─┘                  └─ ...
    pledgeN ── [join link 1] ── join1 ┘

Every host and every link (a bridge in a "switch" namespace of its own) is a network
namespace named ``jpl<run-id>-<role>``. Join links carry only link-local addresses (unless
``join_ula`` asks for a ULA prefix, which NAT66 needs); the backbone carries a ULA prefix.
The proxy does not forward: a pledge can reach the registrar only through a relay.

    with Lab(Topology(pledges=2)) as lab:
        lab.pledges[0].run(["ping", "-c1", f"{PROXY_LL}%eth0"])

With ``pledges_on_backbone`` the pledges sit on the registrars' own link instead (RFC 8995 §4
allows a registrar to serve directly attached pledges), still with link-local addresses only.
"""

import atexit
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import netns, runs
from .netns import LabError

BACKBONE_PREFIX = "fd4a:5044::"  # fd4a:5044::/64 ("JP" in ASCII), inside fc00::/7
PROXY_LL = "fe80::1"


def join_prefix(link: int) -> str:
    return f"fd4a:5044:0:{0x100 + link:x}::"


@dataclass(frozen=True)
class Topology:
    pledges: int = 1
    registrars: int = 1
    join_links: int = 1
    join_ula: bool = False  # also give join links a ULA prefix (for NAT66)
    pledges_on_backbone: bool = False  # pledges beside the registrars, no proxy in between

    def __post_init__(self) -> None:
        if not 0 <= self.pledges <= 500:
            raise LabError("pledges: must be between 0 and 500")
        if not 0 <= self.registrars <= 50:
            raise LabError("registrars: must be between 0 and 50")
        if not 1 <= self.join_links <= 16:
            raise LabError("join_links: must be between 1 and 16")


@dataclass
class LabProcess:
    """A long-lived process started in a namespace, its output captured in a log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 5) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        return self.popen.returncode


@dataclass
class Host:
    name: str
    ns: str
    lab: "Lab"
    interfaces: dict[str, list[str]] = field(default_factory=dict)  # ifname -> addresses

    def cmd(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60,
            env: dict[str, str] | None = None, input: str | None = None,
            ) -> subprocess.CompletedProcess:
        done = subprocess.run(self.cmd(argv), capture_output=True, text=True, timeout=timeout,
                              env=env, input=input, check=False)
        if check and done.returncode != 0:
            raise LabError(f"{self.name}: {' '.join(argv)} exited {done.returncode}: "
                           f"{(done.stderr or done.stdout).strip()[-2000:]}")
        return done

    def spawn(self, argv: Sequence[str], *, name: str | None = None,
              env: dict[str, str] | None = None) -> LabProcess:
        return self.lab._spawn(self, argv, name or Path(argv[0]).name, env)

    def address(self, ifname: str, *, link_local: bool) -> str:
        for addr in self.interfaces.get(ifname, []):
            if addr.startswith("fe80:") == link_local:
                return addr
        raise LabError(f"{self.name}: no {'link-local' if link_local else 'ULA'} on {ifname}")


class Lab:
    """Builds a Topology in fresh namespaces and removes it on exit, error or Ctrl-C."""

    def __init__(self, topology: Topology | None = None, *, log_dir: Path | None = None,
                 persistent: bool = False) -> None:
        self.topology = topology or Topology()
        self.run_id = secrets.token_hex(3)
        self.state = runs.RunState(
            run_id=self.run_id,
            owner_pid=os.getpid(),
            owner_start=runs.process_start_time(os.getpid()) or 0,
            persistent=persistent,
            topology=asdict(self.topology),
        )
        self.log_dir = log_dir or self.state.directory / "logs"
        self.proxy: Host
        self.pledges: list[Host] = []
        self.registrars: list[Host] = []
        self.processes: list[LabProcess] = []
        self._join_links = 0
        self._up = False

    # -- naming ---------------------------------------------------------------------------
    def ns_name(self, role: str) -> str:
        return f"{runs.NS_PREFIX}{self.run_id}-{role}"

    @property
    def hosts(self) -> list[Host]:
        return [self.proxy, *self.pledges, *self.registrars] if self._up else []

    # -- life cycle -----------------------------------------------------------------------
    def __enter__(self) -> "Lab":
        self.up()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    def up(self) -> "Lab":
        runs.clean_stale()
        self.state.save()  # the record exists before anything it records
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not self.state.persistent:
            atexit.register(self.down)
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        self._up = True
        return self

    def down(self) -> None:
        for proc in self.processes:
            proc.stop(timeout=3)
        self.processes.clear()
        runs.destroy(self.state)
        self._up = False
        atexit.unregister(self.down)

    def _namespace(self, role: str) -> str:
        ns = self.ns_name(role)
        self.state.namespaces.append(ns)
        self.state.save()
        netns.add_namespace(ns)
        return ns

    def _build(self) -> None:
        topo = self.topology
        self.proxy = Host("proxy", self._namespace("proxy"), self)
        for link in range(topo.join_links):
            self._add_join_switch(link)
        backbone = self._namespace("bb")
        netns.sysctl(backbone, "net.ipv6.conf.default.disable_ipv6", "1")
        netns.add_bridge(backbone, "br0")
        for i in range(topo.pledges):
            self._add_pledge(i % topo.join_links, on_backbone=topo.pledges_on_backbone)
        netns.add_veth(self.proxy.ns, "bb0", backbone, "proxy")
        netns.enslave(backbone, "proxy", "br0")
        self._configure(self.proxy, "bb0", ["fe80::b:1/64", f"{BACKBONE_PREFIX}1/64"])
        for r in range(topo.registrars):
            host = Host(f"registrar{r}", self._namespace(f"r{r}"), self)
            netns.add_veth(host.ns, "eth0", backbone, f"r{r}")
            netns.enslave(backbone, f"r{r}", "br0")
            self._configure(host, "eth0", [f"fe80::b:{r + 2:x}/64",
                                           f"{BACKBONE_PREFIX}{0x100 + r:x}/64"])
            self.registrars.append(host)
        netns.wait_settled(self.proxy.ns, list(self.proxy.interfaces))
        for host in [*self.pledges, *self.registrars]:
            netns.wait_settled(host.ns, ["eth0"])

    def _add_join_switch(self, link: int) -> str:
        switch = self._namespace(f"join{link}")
        netns.sysctl(switch, "net.ipv6.conf.default.disable_ipv6", "1")
        netns.add_bridge(switch, "br0")
        ifname = f"join{link}"
        netns.add_veth(self.proxy.ns, ifname, switch, "proxy")
        netns.enslave(switch, "proxy", "br0")
        self._configure(self.proxy, ifname, [f"{PROXY_LL}/64"]
                        + ([f"{join_prefix(link)}1/64"] if self.topology.join_ula else []))
        self._join_links = max(self._join_links, link + 1)
        return ifname

    def _add_pledge(self, link: int, *, on_backbone: bool = False) -> Host:
        i = len(self.pledges)
        host = Host(f"pledge{i}", self._namespace(f"p{i}"), self)
        switch = self.ns_name("bb") if on_backbone else self.ns_name(f"join{link}")
        netns.add_veth(host.ns, "eth0", switch, f"p{i}")
        netns.enslave(switch, f"p{i}", "br0")
        addrs = [f"fe80::1:{i + 1:x}/64"]
        with_ula = self.topology.join_ula and not on_backbone
        if with_ula:
            addrs.append(f"{join_prefix(link)}{0x100 + i:x}/64")
        self._configure(host, "eth0", addrs)
        # A real pledge's frames carry finished checksums; a veth would leave them to be
        # filled in later (CHECKSUM_PARTIAL), which no longer happens once a stateless relay
        # has wrapped the packet in another header (platform.md, fact 4).
        netns.run(["ip", "netns", "exec", host.ns, "ethtool", "-K", "eth0", "tx", "off"])
        if with_ula:
            netns.ip(host.ns, "-6", "route", "add", "default", "via", PROXY_LL, "dev", "eth0")
        self.pledges.append(host)
        return host

    def add_join_link(self, pledges: int = 1) -> tuple[str, list[Host]]:
        """Plug a new join link into the running proxy (as a hot-plugged port would be), with
        `pledges` new pledges on it. Returns the proxy's interface name and the pledges."""
        ifname = self._add_join_switch(self._join_links)
        link = self._join_links - 1
        hosts = [self._add_pledge(link) for _ in range(pledges)]
        netns.wait_settled(self.proxy.ns, [ifname])
        for host in hosts:
            netns.wait_settled(host.ns, ["eth0"])
        return ifname, hosts

    def remove_join_link(self, ifname: str) -> None:
        """Unplug a join link from the proxy: its interface disappears (the pledges stay)."""
        netns.ip(self.proxy.ns, "link", "del", ifname)
        self.proxy.interfaces.pop(ifname, None)

    def _configure(self, host: Host, ifname: str, cidrs: list[str]) -> None:
        for cidr in cidrs:
            netns.add_address(host.ns, ifname, cidr)
        netns.link_up(host.ns, ifname)
        host.interfaces[ifname] = [c.split("/")[0] for c in cidrs]

    # -- processes ------------------------------------------------------------------------
    def _spawn(self, host: Host, argv: Sequence[str], name: str,
               env: dict[str, str] | None) -> LabProcess:
        log_path = self.log_dir / f"{host.name}-{name}-{len(self.processes)}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - handed to the child, closed below
        try:
            popen = subprocess.Popen(host.cmd(argv), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        finally:
            log.close()
        proc = LabProcess(name, popen, log_path)
        self.processes.append(proc)
        self.state.pids.append(popen.pid)
        self.state.save()
        return proc

    # -- inspection -----------------------------------------------------------------------
    def describe(self) -> str:
        lines = [f"lab {self.run_id}: {len(self.pledges)} pledge(s), "
                 f"{self.topology.join_links} join link(s), {len(self.registrars)} registrar(s)"]
        for host in self.hosts:
            for ifname, addrs in host.interfaces.items():
                lines.append(f"  {host.name:<12} {host.ns:<20} {ifname:<6} {' '.join(addrs)}")
        return "\n".join(lines)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll `predicate` until it returns something truthy; raise LabError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
