"""At debug level the daemon's own lines are not drowned by its libraries' (issue 11, defect
9e): pyroute2 dumps every netlink message, asyncio and zeroconf talk too. They stay at
WARNING unless JOINPROXYD_DEBUG_LIBRARIES names them."""

import os
import subprocess
import sys

import pytest

from lab import Lab, Topology, wait_for
from lab.proxyd import ProxyDaemon, base_config, echo_registrar

SCRIPT = """
import logging
from joinproxyd import logs
log = logs.setup("debug")
for name in ("pyroute2.netlink.core", "asyncio", "zeroconf", "aiohttp.access"):
    logging.getLogger(name).debug("chatter from %s", name)
    logging.getLogger(name).warning("trouble in %s", name)
log.debug("our own debug line")
logs.set_level("debug")  # a reload to debug must not bring the chatter back
logging.getLogger("pyroute2").debug("chatter after the reload")
"""


def run(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("JOURNAL_STREAM", "JOINPROXYD_DEBUG_LIBRARIES")}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env={**env, **env_extra}, timeout=30, check=True)
    return done.stderr


def test_libraries_stay_at_warning_at_debug_level():
    err = run({})
    assert "our own debug line" in err
    assert "chatter" not in err, err
    for name in ("pyroute2.netlink.core", "asyncio", "zeroconf", "aiohttp.access"):
        assert f"trouble in {name}" in err  # warnings still get through


def test_the_environment_turns_one_library_up():
    err = run({"JOINPROXYD_DEBUG_LIBRARIES": "pyroute2"})
    assert "chatter from pyroute2.netlink.core" in err
    assert "chatter after the reload" in err
    assert "chatter from asyncio" not in err and "chatter from zeroconf" not in err
    err = run({"JOINPROXYD_DEBUG_LIBRARIES": "all"})
    assert "chatter from zeroconf" in err and "chatter from asyncio" in err


@pytest.mark.netns
def test_the_running_daemon_at_debug_level_logs_no_netlink_dumps(as_root, tmp_path):
    with Lab(Topology(pledges=1, registrars=1), log_dir=tmp_path / "logs") as lab:
        config = base_config(tmp_path / "proxy")
        assert config["daemon"]["log_level"] == "debug"
        echo_registrar(lab.registrars[0], "r0")
        daemon = ProxyDaemon(lab, tmp_path / "proxy", config).start()
        ifname, _ = lab.add_join_link(pledges=0)  # netlink events: what pyroute2 would dump
        wait_for(lambda: daemon.sample("joinproxyd_announcements_total", method="grasp",
                                       interface=ifname) >= 1, 10, "a flood on the new link")
        assert daemon.stop() == 0
        lines = daemon.log().splitlines()
        assert any(line.startswith("DEBUG joinproxyd:") for line in lines)
        noise = [line for line in lines if line.startswith(("DEBUG pyroute2", "DEBUG asyncio"))]
        assert noise == [], noise[:5]


REGISTRAR_SCRIPT = """
import logging
from registrar.service import setup_logging
setup_logging(logging.DEBUG)
import pyroute2  # resets its logger's level when imported
for name in ("pyroute2.netlink.core", "asyncio", "zeroconf"):
    logging.getLogger(name).debug("chatter from %s", name)
logging.getLogger("aiohttp.access").info("access line")
logging.getLogger("registrar").debug("our own debug line")
"""


def test_the_registrar_at_debug_level_logs_its_own_lines_and_accesses_only():
    env = {k: v for k, v in os.environ.items() if k != "BRSKI_DEBUG_LIBRARIES"}
    err = subprocess.run([sys.executable, "-c", REGISTRAR_SCRIPT], capture_output=True,
                         text=True, env=env, timeout=30, check=True).stderr
    assert "our own debug line" in err and "access line" in err
    assert "chatter" not in err, err
    err = subprocess.run([sys.executable, "-c", REGISTRAR_SCRIPT], capture_output=True,
                         text=True, env={**env, "BRSKI_DEBUG_LIBRARIES": "zeroconf"},
                         timeout=30, check=True).stderr
    assert "chatter from zeroconf" in err and "chatter from asyncio" not in err


@pytest.mark.netns
def test_pledge_sim_at_debug_level_logs_no_library_chatter(as_root, tmp_path):
    with Lab(Topology(pledges=1), log_dir=tmp_path / "logs") as lab:
        done = lab.pledges[0].run([sys.executable, "-m", "pledge_sim.cli", "-vv", "discover",
                                   "--timeout", "1"], check=False)
        lines = done.stderr.splitlines()
        assert lines, done
        noise = [line for line in lines if "zeroconf" in line.lower()
                 or "asyncio" in line.lower() or "Using selector" in line]
        assert noise == [], noise[:5]
