"""Status is true for the kernel relay modes too (issue 11, defect 2, same class): a link is
announced and reported as served by nat66 or ipip only while that mode really relays it. A
nat66 link without a usable backbone, or an ipip link whose registrar offers no IPIP, is
"not served" with the reason, and pledges are not told to use it. The real daemon in a
namespace lab."""

from pathlib import Path

import pytest

from brski import grasp
from lab import Lab, Topology, wait_for
from lab.proxyd import PYTHON, ProxyDaemon, base_config, echo_registrar
from lab.sniffers import GRASP_SNIFFER, heard

pytestmark = pytest.mark.netns




def registrar_healthy(daemon: ProxyDaemon) -> dict | None:  # type: ignore[type-arg]
    status = daemon.ctl()
    return status if status["registrars"] and status["registrars"][0]["healthy"] else None


def test_nat66_without_a_backbone_is_not_announced_but_the_circuit_is(as_root, tmp_path):
    with Lab(Topology(pledges=1, registrars=1, join_ula=True),
             log_dir=tmp_path / "logs") as lab:
        echo_registrar(lab.registrars[0], "r0")
        sniffer = lab.pledges[0].spawn([PYTHON, "-c", GRASP_SNIFFER], name="grasp-sniffer")
        config = base_config(
            tmp_path / "proxy", backbone={"interface": "bbx"},  # bb0 routes, but is not named
            join=[{"interfaces": ["join*"], "modes": ["circuit", "nat66"], "port": 8443}])
        daemon = ProxyDaemon(lab, tmp_path / "proxy", config).start()
        status = wait_for(lambda: registrar_healthy(daemon), 10, "a healthy registrar")
        (join0,) = status["interfaces"]
        assert join0["modes"] == ["circuit"], join0
        assert join0["not_serving"]["nat66"] == "nat66: the backbone interface is not known"
        assert status["joining"] is True  # the circuit serves
        _, data = wait_for(lambda: heard(sniffer.log()), 5, "an AN_Proxy flood")[0]
        locators = grasp.Flood.decode(data).locators_for("AN_Proxy")
        assert [str(loc.address) for loc in locators] == ["fe80::1"], \
            "a ULA announced for a NAT66 that relays nothing"
        text = daemon.host.run([PYTHON, "-m", "joinproxyd.ctl", "--socket",
                                config["daemon"]["control_socket"], "status"]).stdout
        assert "join0: nat66: the backbone interface is not known" in text
        assert daemon.stop() == 0


def test_ipip_link_of_a_registrar_without_ipip_is_not_served(as_root, tmp_path: Path):
    with Lab(Topology(pledges=1, registrars=1), log_dir=tmp_path / "logs") as lab:
        echo_registrar(lab.registrars[0], "r0")
        config = base_config(
            tmp_path / "proxy", daemon={"bpf_pin_dir": str(tmp_path / "bpf")},
            join=[{"interfaces": ["join*"], "modes": ["ipip"], "port": 8443}],
            ipip={"backbone_prefix": "fd4a:5044::1:0/112"})
        daemon = ProxyDaemon(lab, tmp_path / "proxy", config).start()
        status = wait_for(lambda: registrar_healthy(daemon), 10, "a healthy registrar")
        assert status["interfaces"] == []
        (unserved,) = status["unserved"]
        assert unserved["name"] == "join0"
        assert unserved["reason"] == ("ipip: registrar [fd4a:5044::100]:8443 does not offer "
                                      "IPIP")
        assert (status["joining"], status["joining_reason"]) == (False, "no join link served")
        assert daemon.sample("joinproxyd_join_interfaces") == 0
        assert daemon.stop() == 0
