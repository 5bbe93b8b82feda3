"""Series labelled with an interface go when the interface goes (issue 11, defect 9b):
interface names come and go with hot-plug, and a series that outlives its link is a lie on
a dashboard (and grows without bound). The real daemon in a namespace lab, read over
/metrics."""

import pytest

from lab import Lab, Topology, wait_for
from lab.proxyd import ProxyDaemon, base_config, echo_registrar, talk

pytestmark = pytest.mark.netns


@pytest.fixture
def lab(as_root, tmp_path):
    with Lab(Topology(pledges=1, registrars=1), log_dir=tmp_path / "logs") as lab:
        yield lab


def series_of(daemon: ProxyDaemon, interface: str) -> set[str]:
    return {name for name, labels in daemon.metrics()
            if dict(labels).get("interface") == interface}


def test_series_of_a_removed_link_are_removed(lab, tmp_path):
    echo_registrar(lab.registrars[0], "r0")
    daemon = ProxyDaemon(lab, tmp_path / "proxy", base_config(tmp_path / "proxy")).start()
    wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
    ifname, (pledge,) = lab.add_join_link(pledges=1)
    wait_for(lambda: talk(pledge, timeout=1).startswith("r0"), 10, "relaying on the new link")
    wait_for(lambda: {"joinproxyd_circuits_active", "joinproxyd_announcements_total"}
             <= series_of(daemon, ifname), 10, f"{ifname}'s series")
    assert "joinproxyd_announcements_total" in series_of(daemon, "join0")

    lab.remove_join_link(ifname)
    wait_for(lambda: not series_of(daemon, ifname), 10, f"{ifname}'s series to go")
    # the links still there keep theirs
    assert "joinproxyd_announcements_total" in series_of(daemon, "join0")
    assert daemon.stop() == 0
