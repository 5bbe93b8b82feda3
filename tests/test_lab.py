"""The namespace lab: reachability rules, process capture and clean teardown (real namespaces)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lab import Lab, LabError, Topology, netns, runs, wait_for
from lab.topology import PROXY_LL

pytestmark = pytest.mark.netns
PYTHON = sys.executable


def our_namespaces(run_id: str) -> list[str]:
    return [ns for ns in netns.list_namespaces() if ns.startswith(f"jpl{run_id}-")]


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def ping(host, target: str) -> bool:  # type: ignore[no-untyped-def]
    return host.run(["ping", "-6", "-c", "1", "-W", "1", target], check=False).returncode == 0


def test_pledge_reaches_proxy_link_local_but_not_registrar(as_root, tmp_path):
    with Lab(Topology(pledges=2, registrars=1), log_dir=tmp_path) as lab:
        pledge = lab.pledges[0]
        assert ping(pledge, f"{PROXY_LL}%eth0")
        assert ping(lab.pledges[1], f"{PROXY_LL}%eth0")
        registrar = lab.registrars[0].address("eth0", link_local=False)
        # The proxy itself reaches the registrar over the backbone...
        assert ping(lab.proxy, registrar)
        # ...the pledge has no route to it...
        assert not ping(pledge, registrar)
        # ...and even with a route through the proxy, the proxy does not forward.
        pledge.run(["ip", "-6", "route", "add", "fd4a:5044::/64", "via", PROXY_LL, "dev", "eth0"])
        assert not ping(pledge, registrar)
        forwarding = lab.proxy.run(["sysctl", "-n", "net.ipv6.conf.all.forwarding"]).stdout
        assert forwarding.strip() == "0"


def test_addresses_are_settled_and_not_tentative(as_root, tmp_path):
    with Lab(Topology(pledges=3, registrars=2), log_dir=tmp_path) as lab:
        for host in lab.hosts:
            out = host.run(["ip", "-6", "addr", "show", "tentative"]).stdout
            assert out.strip() == "", f"{host.name} has tentative addresses: {out}"
        assert lab.registrars[1].address("eth0", link_local=False) == "fd4a:5044::101"
        assert ping(lab.registrars[0], lab.registrars[1].address("eth0", link_local=False))


def test_several_join_links_are_separate_links(as_root, tmp_path):
    with Lab(Topology(pledges=2, join_links=2), log_dir=tmp_path) as lab:
        assert set(lab.proxy.interfaces) == {"join0", "join1", "bb0"}
        # pledge1 sits on join link 1: the proxy reaches it through join1 only.
        pledge1_ll = lab.pledges[1].address("eth0", link_local=True)
        assert ping(lab.proxy, f"{pledge1_ll}%join1")
        assert not ping(lab.proxy, f"{pledge1_ll}%join0")
        # Pledges on different join links cannot talk to each other at all.
        pledge0_ll = lab.pledges[0].address("eth0", link_local=True)
        assert not ping(lab.pledges[1], f"{pledge0_ll}%eth0")


def test_join_ula_gives_pledges_a_prefix_and_a_default_route(as_root, tmp_path):
    with Lab(Topology(pledges=1, join_ula=True), log_dir=tmp_path) as lab:
        ula = lab.pledges[0].address("eth0", link_local=False)
        assert ula.startswith("fd4a:5044:0:100::")
        assert ping(lab.pledges[0], "fd4a:5044:0:100::1")
        routes = lab.pledges[0].run(["ip", "-6", "route", "show", "default"]).stdout
        assert PROXY_LL in routes


def test_spawned_process_output_is_captured_and_stopped(as_root, tmp_path):
    with Lab(Topology(pledges=1), log_dir=tmp_path) as lab:
        proc = lab.pledges[0].spawn(
            ["sh", "-c", "echo started; ip -br -6 addr show dev eth0; exec sleep 600"], name="sh"
        )
        wait_for(lambda: "fe80::1:1" in proc.log(), 5, "the process output")
        assert "started" in proc.log()
        assert proc.alive()
        pid = proc.pid
    assert not alive(pid)


def test_teardown_leaves_no_namespace_link_or_process(as_root, tmp_path):
    lab = Lab(Topology(pledges=2, registrars=1), log_dir=tmp_path)
    with lab:
        sleeper = lab.registrars[0].spawn(["sleep", "600"])
        # A process started behind the lab's back in one of its namespaces is removed too.
        stray = subprocess.Popen(["ip", "netns", "exec", lab.proxy.ns, "sleep", "600"])
        assert len(our_namespaces(lab.run_id)) == 6  # proxy, join0 switch, 2 pledges, bb, r0
    stray.wait(5)
    assert our_namespaces(lab.run_id) == []
    assert not alive(sleeper.pid)
    assert not runs.RunState(lab.run_id, 0, 0).directory.exists()
    # No veth of the run leaked into the root namespace either.
    root_links = netns.ip(None, "-br", "link").split()
    assert not any(name.startswith(("join0", "bb0", "p0@", "r0@")) for name in root_links)


def test_teardown_happens_on_exceptions(as_root, tmp_path):
    lab = Lab(Topology(pledges=1), log_dir=tmp_path)
    with pytest.raises(RuntimeError, match="boom"), lab:
        assert our_namespaces(lab.run_id)
        raise RuntimeError("boom")
    assert our_namespaces(lab.run_id) == []


def test_two_labs_coexist_with_unique_names(as_root, tmp_path):
    with Lab(Topology(), log_dir=tmp_path / "a") as one, Lab(Topology(), log_dir=tmp_path / "b") \
            as two:
        assert one.run_id != two.run_id
        assert ping(one.pledges[0], f"{PROXY_LL}%eth0")
        assert ping(two.pledges[0], f"{PROXY_LL}%eth0")


HOLDER = """
import sys, time
from lab import Lab, Topology
lab = Lab(Topology(pledges=1)).up()
proc = lab.pledges[0].spawn(["sleep", "600"])
print(lab.run_id, proc.pid, flush=True)
time.sleep(600)
"""


def start_holder() -> tuple[subprocess.Popen, str, int]:
    holder = subprocess.Popen([PYTHON, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    line = holder.stdout.readline().split()
    assert line, "the lab holder did not start"
    return holder, line[0], int(line[1])


def test_killed_run_is_cleaned_by_the_next(as_root, tmp_path):
    holder, run_id, sleeper = start_holder()
    holder.kill()  # SIGKILL: no finaliser runs
    holder.wait(5)
    assert our_namespaces(run_id), "the killed run should have left its namespaces"
    assert alive(sleeper)
    with Lab(Topology(), log_dir=tmp_path):
        assert our_namespaces(run_id) == []
        wait_for(lambda: not alive(sleeper), 5, "the killed run's process to end")


def test_ctrl_c_tears_down(as_root):
    holder, run_id, sleeper = start_holder()
    holder.send_signal(signal.SIGINT)
    holder.wait(10)
    assert our_namespaces(run_id) == []
    assert not alive(sleeper)


def test_live_run_is_not_cleaned_by_another(as_root, tmp_path):
    holder, run_id, sleeper = start_holder()
    try:
        with Lab(Topology(), log_dir=tmp_path):
            assert our_namespaces(run_id)
            assert alive(sleeper)
    finally:
        holder.send_signal(signal.SIGINT)
        holder.wait(10)
    assert our_namespaces(run_id) == []


def test_cli_up_status_down(as_root):
    lab_cli = [PYTHON, "-m", "lab.cli"]
    up = subprocess.run([*lab_cli, "up", "--pledges", "2", "--registrars", "2"],
                        capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    run_id = up.stdout.split()[1].rstrip(":")
    try:
        assert len(our_namespaces(run_id)) == 7
        status = subprocess.run([*lab_cli, "status"], capture_output=True, text=True, timeout=60)
        assert f"lab {run_id} (persistent)" in status.stdout
        assert "fd4a:5044::101" in status.stdout
    finally:
        down = subprocess.run([*lab_cli, "down"], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0
    assert our_namespaces(run_id) == []


def test_cli_rejects_bad_topology_with_one_line(as_root):
    done = subprocess.run([PYTHON, "-m", "lab.cli", "up", "--pledges", "-1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == "joinproxy-lab: pledges: must be between 0 and 500"


def test_topology_limits_are_checked():
    with pytest.raises(LabError, match="join_links"):
        Topology(join_links=0)


def test_demo_exits_zero(as_root):
    done = subprocess.run([PYTHON, "-m", "lab.cli", "demo"], capture_output=True, text=True,
                          timeout=120, env={**os.environ})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "unreachable, as it must be" in done.stdout


def test_pledges_on_backbone_reach_the_registrar_link_local(as_root, tmp_path):
    with Lab(Topology(pledges=1, pledges_on_backbone=True), log_dir=tmp_path) as lab:
        registrar_ll = lab.registrars[0].address("eth0", link_local=True)
        assert ping(lab.pledges[0], f"{registrar_ll}%eth0")
        assert not ping(lab.pledges[0], f"{PROXY_LL}%eth0")


def test_join_links_can_be_plugged_and_unplugged_at_run_time(as_root, tmp_path):
    with Lab(Topology(pledges=1), log_dir=tmp_path) as lab:
        ifname, (pledge,) = lab.add_join_link(pledges=1)
        assert ifname == "join1"
        assert pledge.name == "pledge1"
        assert ping(pledge, f"{PROXY_LL}%eth0")
        assert not ping(lab.pledges[0], f"{pledge.address('eth0', link_local=True)}%eth0")
        lab.remove_join_link("join1")
        assert "join1" not in lab.proxy.run(["ip", "-br", "link"]).stdout
        assert not ping(pledge, f"{PROXY_LL}%eth0")
