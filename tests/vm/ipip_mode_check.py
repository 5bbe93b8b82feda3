"""ipip_mode.sh's checks, in the proxy's namespace x of the VM: the relay mode (IpipMode)
with ipip.datapath "kernel" and "auto" (no libbpf in this guest: BPF does not run, so auto
takes the tunnels) serves a link-local pledge, says so in its status, counts from the
tunnel's statistics, and leaves nothing behind when closed. Exit status: failures."""

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from joinproxyd.config import IpipSettings
from joinproxyd.kernel import ip6tnl
from joinproxyd.metrics import Metrics
from joinproxyd.model import IpipTarget, JoinInterface, LinkState, RegistrarEndpoint
from joinproxyd.relays.base import RelayContext
from joinproxyd.relays.ipip import IpipMode

failures = 0
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")


def check(name, ok, detail=""):
    global failures
    print(f"CHECK {name}: {'PASS' if ok else 'FAIL'} {detail}".rstrip(), flush=True)
    failures += 0 if ok else 1


def run(*argv, ns=None):
    argv = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def index(name):
    return json.loads(run("ip", "-j", "link", "show", name).stdout)[0]["ifindex"]


ECHO = Path("/job/ipip_kernel_check.py").read_text().split('ECHO = """')[1].split('"""')[0]
PLEDGE = Path("/job/ipip_kernel_check.py").read_text().split('PLEDGE = """')[1].split('"""')[0]


async def main(setting: str) -> None:
    join, backbone = index("join0"), index("bb0")
    settings = IpipSettings(backbone_addresses={"join0": "fd00::11"}, datapath=setting,
                            knob_record=Path(f"/tmp/knobs-{setting}.json"))
    ctx = RelayContext(Metrics(), lambda: None, lambda: LinkState("bb0", backbone, True),
                       logging.getLogger("ipip"), datapath=None, ipip=lambda: settings)
    mode = IpipMode(ctx)
    iface = JoinInterface("join0", join, "fe80::1", (), ("ipip",), 8443)
    registrar = RegistrarEndpoint(10, "fd00::100", 8443, ipip=IpipTarget(
        "fe80::2", "fd00::100", (41,), (8443,)))
    await mode.reconcile([iface], registrar)
    status = mode.status()
    check(f"{setting}_tunnel_path_chosen", status["datapath"]["active"] == "kernel"
          and mode.error is None, json.dumps(status["datapath"]) + f" error={mode.error}")
    check(f"{setting}_proxy_ndp", status["interfaces"][0]["proxy_ndp"], json.dumps(status))
    done = run("python3", "-c", PLEDGE, ns="p")
    check(f"{setting}_pledge_through_the_mode", done.returncode == 0,
          (done.stdout + done.stderr).strip()[-500:])
    stats = mode.status()["datapath"]["tunnel_stats"] or {}
    check(f"{setting}_status_counts_from_the_tunnel",
          stats.get("tx_packets", 0) >= 4 and stats.get("rx_packets", 0) >= 4, json.dumps(stats))
    check(f"{setting}_unserved_is_empty", mode.unserved() == {}, str(mode.unserved()))
    await mode.close(0)
    left = {
        "tunnel": bool(await asyncio.to_thread(ip6tnl.ours)),
        "nft": "joinproxyd_ipip" in run("nft", "list", "tables").stdout,
        "filters": "u32" in run("tc", "filter", "show", "dev", "join0", "ingress").stdout,
        "proxy": "fe80::2" in run("ip", "-6", "neigh", "show", "proxy").stdout,
        "address": "fd00::11" in run("ip", "-6", "addr", "show", "dev", "bb0").stdout,
        "forwarding": Path("/proc/sys/net/ipv6/conf/join0/forwarding").read_text().strip(),
    }
    check(f"{setting}_close_leaves_nothing", not any(v for k, v in left.items()
                                                     if k != "forwarding")
          and left["forwarding"] == "0", json.dumps(left))


echo = subprocess.Popen(["ip", "netns", "exec", "r", "python3", "-c", ECHO])
deadline = time.monotonic() + 30
while ":8443" not in run("ss", "-Hlnt", ns="r").stdout and time.monotonic() < deadline:
    time.sleep(0.2)
for setting in ("kernel", "auto"):
    asyncio.run(main(setting))
echo.kill()
print(f"failed checks: {failures}")
sys.exit(failures)
