"""What bench/jpy_relay.py and bench/cojp_relay.py share: a stateless relay mode of the real
joinproxyd against the least any UDP relay can do, in one namespace lab, paired per round.

The lab has one pledge and one registrar host. The registrar host runs the benchmark's echo
(a ``python -c`` script that answers on each port it is given and prints "ready"): the first
port for joinproxyd, ECHO_PORT for the bare relay, the same code. The proxy runs joinproxyd
(the mode on join0) and, beside it on [fe80::1%join0]:BARE_PORT, _udpflow.py single-relay
towards ECHO_PORT. The pledge runs _udpflow.py pingpong: WINDOW datagrams of 64 bytes in
flight, each answer sending the next, for ``seconds``. Each round measures both paths, order
rotated; the ratio joinproxyd/bare is paired within a round; medians (min-max) are printed,
and the benchmark records them for `make bench` (bench/_report.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import Lab, Topology, wait_for
from lab.proxyd import ProxyDaemon, base_config

PY = sys.executable
FLOW = str(Path(__file__).resolve().parent / "_udpflow.py")
BARE_PORT = 9443
ECHO_PORT = 5690
REGISTRAR = "fd4a:5044::100"
PROXY_LL = "fe80::1"
WINDOW = 32
TARGET = 0.8  # joinproxyd/bare


@dataclass
class StatelessBench:
    mode: str  # "jpy" or "cojp": the join links' mode and its [section]
    join_port: int
    registrar_port: int  # the registrar's <mode>_port, where the echo answers joinproxyd
    echo: str  # the echo script (see above)
    echo_name: str  # what waiting for it says
    shape: str  # _udpflow.py pingpong's datagram shape
    drop_reasons: tuple[str, ...]  # printed after the run
    settings: dict[str, Any] = field(default_factory=dict)  # the mode's config section
    # checks the started daemon (SystemExit with why, if it cannot measure what was asked)
    check: Callable[[ProxyDaemon], None] | None = None

    def measure(self, lab: Lab, port: int, seconds: float) -> float:
        done = lab.pledges[0].run([PY, FLOW, "pingpong", PROXY_LL, str(port), str(seconds),
                                   str(WINDOW), self.shape], timeout=seconds + 30)
        result = json.loads(done.stdout)
        return float(result["datagrams"] / result["seconds"])

    def run(self, seconds: float, rounds: int, title: str,
            record: Callable[[dict[str, list[float]], list[float]], None]) -> None:
        """Measure and print (``title`` first); ``record`` gets the rates by path and the
        paired ratios right after they are printed (the benchmark's own record() calls)."""
        with tempfile.TemporaryDirectory(prefix=f"{self.mode}-bench-") as tmp, \
                Lab(Topology(pledges=1), log_dir=Path(tmp) / "logs") as lab:
            registrar = lab.registrars[0]
            registrar.spawn(["socat", "TCP6-LISTEN:8443,fork,reuseaddr", "SYSTEM:true"],
                            name="tcp-health")
            echo = registrar.spawn([PY, "-c", self.echo, str(self.registrar_port),
                                    str(ECHO_PORT)], name="echo")
            wait_for(lambda: "ready" in echo.log(), 10, self.echo_name)
            config = base_config(
                Path(tmp) / "proxy", daemon={"log_level": "info",
                                             "control_socket": str(Path(tmp) / "proxy/ctl.sock"),
                                             "drain_seconds": 1},
                join=[{"interfaces": ["join*"], "modes": [self.mode], "port": self.join_port}],
                registrars={"discovery": ["static"],
                            "static": [{"address": REGISTRAR, "port": 8443, "preference": 10,
                                        f"{self.mode}_port": self.registrar_port}],
                            "health_interval": 1, "health_timeout": 1},
                guard={"enabled": False}, **{self.mode: self.settings})
            daemon = ProxyDaemon(lab, Path(tmp) / "proxy", config).start()
            wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
            if self.check is not None:
                self.check(daemon)
            bare = lab.proxy.spawn([PY, FLOW, "single-relay", PROXY_LL, str(BARE_PORT), "join0",
                                    REGISTRAR, str(ECHO_PORT)], name="bare-relay")
            wait_for(lambda: "ready" in bare.log() or not bare.alive(), 10, "the bare relay")
            if not bare.alive():
                raise SystemExit(f"bare relay failed: {bare.log()}")
            paths = {"joinproxyd": self.join_port, "bare": BARE_PORT}
            results: dict[str, list[float]] = {path: [] for path in paths}
            for r in range(rounds):
                order = list(paths) if r % 2 == 0 else list(reversed(paths))
                for path in order:
                    results[path].append(self.measure(lab, paths[path], seconds))
                print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
            ratios = [j / b for j, b in zip(results["joinproxyd"], results["bare"], strict=True)]
            print(title)
            for path, values in results.items():
                print(f"{path:<12} {statistics.median(values):10.0f} datagrams/s "
                      f"({min(values):.0f}-{max(values):.0f})")
            print(f"ratio joinproxyd/bare {statistics.median(ratios):.2f} "
                  f"({min(ratios):.2f}-{max(ratios):.2f}) (target {TARGET:g})")
            record(results, ratios)
            drops = {reason: daemon.drops(self.mode, reason) for reason in self.drop_reasons}
            print(f"joinproxyd drops during the run: {drops}")
            daemon.stop()


def options(doc: str | None, argv: list[str] | None = None,
            extra: Callable[[Any], None] | None = None) -> Any:
    """--seconds, --rounds and --quick (one short round), and what ``extra`` adds."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one short round (smoke test)")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 0.5, 1
    return args
