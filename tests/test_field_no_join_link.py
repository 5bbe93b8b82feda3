"""A fresh router install serves nothing (issue 12): the shipped joinproxyd.toml names no join
link, and a daemon started with it runs, gets ready, and serves nothing -- no listener on the
join port, no XDP program, no announcement -- while STATUS=, `joinproxyctl status` and the
journal say why; a reload that adds a [[join]] table then serves the link. The real daemon in
a namespace lab."""

import json
import time

import pytest
from test_field_readiness import floods
from test_ipip_daemon import bpffs

from lab import Lab, Topology, wait_for
from lab.proxyd import PYTHON, ProxyDaemon, base_config, echo_registrar, talk
from lab.sniffers import GRASP_SNIFFER

__all__ = ["bpffs"]  # the fixture

pytestmark = pytest.mark.netns

REASON = "no join link configured"


@pytest.fixture
def lab(as_root, tmp_path):
    with Lab(Topology(pledges=1, registrars=1), log_dir=tmp_path / "logs") as lab:
        yield lab


def xdp_programs(host) -> list[str]:  # type: ignore[no-untyped-def]
    return [link["ifname"] for link in json.loads(host.run(["ip", "-j", "-d", "link"]).stdout)
            if "prog" in link.get("xdp", {})]


def test_no_join_table_serves_nothing_and_says_so_until_one_is_added(lab, bpffs, tmp_path):
    echo_registrar(lab.registrars[0], "r0")
    sniffer = lab.pledges[0].spawn([PYTHON, "-c", GRASP_SNIFFER], name="grasp-sniffer")
    run_dir = tmp_path / "proxy"
    # the shipped file's guard, on; no [[join]] table
    config = base_config(run_dir, guard={"enabled": True, "rate": 20, "burst": 40},
                         daemon={"bpf_pin_dir": str(bpffs / "joinproxyd")})
    del config["join"]
    daemon = ProxyDaemon(lab, run_dir, config)
    daemon.start()  # READY=1: nothing it is asked to serve is missing
    assert daemon.notify is not None
    ready = next(m for m in daemon.notify.poll() if m.startswith("READY=1"))
    assert REASON in ready, ready
    status = wait_for(lambda: (s := daemon.ctl())["registrars"][0]["healthy"] and s, 15,
                      "a healthy registrar")
    assert status["joining"] is False and status["joining_reason"].startswith(REASON), status
    assert status["interfaces"] == [] and status["unserved"] == []
    text = lab.proxy.run([PYTHON, "-m", "joinproxyd.ctl", "--socket",
                          config["daemon"]["control_socket"], "status"]).stdout
    assert f"joining CLOSED ({REASON}" in text, text
    assert f"started: serving nothing ({REASON}" in daemon.log(), daemon.log()
    time.sleep(2.5)  # announce interval 1 s: floods would have come by now
    assert floods(sniffer) == [], "an AN_Proxy flood from a proxy with no join link"
    assert not any(key[0] == "joinproxyd_announcements_total" and value
                   for key, value in daemon.metrics().items())
    listening = lab.proxy.run(["ss", "-Hlntu"]).stdout
    assert ":8443 " not in listening, listening
    assert xdp_programs(lab.proxy) == []
    assert status["bpf"] is None and not status["guard"]["running"], status  # nothing loaded
    assert not (bpffs / "joinproxyd").exists()
    assert daemon.sample("joinproxyd_join_interfaces") == 0

    # The operator names the join link and reloads: it is served, guarded and announced.
    config["join"] = [{"interfaces": ["join0"], "modes": ["circuit"], "port": 8443}]
    daemon.write_config(config)
    daemon.signal(1)  # SIGHUP
    wait_for(lambda: daemon.ctl()["joining"], 15, "joining open after the reload")
    assert talk(lab.pledges[0], "ClientHello") == "r0\nClientHello\n"
    wait_for(lambda: xdp_programs(lab.proxy) == ["join0"], 10,
             f"the guard on join0: {daemon.ctl()['guard']}\n{daemon.log()[-3000:]}")
    wait_for(lambda: floods(sniffer), 5, "an AN_Proxy flood after the reload")
    assert REASON not in daemon.notify.poll()[-1]

    # And back: the table removed again, the link is released and nothing stays loaded.
    del config["join"]
    daemon.write_config(config)
    daemon.signal(1)
    wait_for(lambda: (s := daemon.ctl())["joining_reason"].startswith(REASON) and s, 15,
             "no join link again")
    wait_for(lambda: ":8443 " not in lab.proxy.run(["ss", "-Hlntu"]).stdout, 10,
             "the join port closed")
    wait_for(lambda: xdp_programs(lab.proxy) == [], 10, "the guard detached")
    status = daemon.ctl()
    assert status["interfaces"] == [] and status["bpf"] is None, status
    assert daemon.stop() == 0
