"""joinproxyd running for real in a lab's proxy namespace, for tests, benchmarks and the demo.

It writes a configuration file, starts the daemon with a notify socket of its own (so READY=1
is observed, not guessed), and reads it back the way an operator would: joinproxyctl --json
over the control socket and /metrics over HTTP, parsed with prometheus_client's parser.
"""

import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .topology import Host, Lab, LabProcess, wait_for

PYTHON = sys.executable


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def toml(tables: dict[str, Any]) -> str:
    """Enough TOML for joinproxyd.toml: tables of scalars/lists, and [[join]] arrays."""
    out = []
    for name, body in tables.items():
        entries = body if isinstance(body, list) else [body]
        for entry in entries:
            out.append(f"[[{name}]]" if isinstance(body, list) else f"[{name}]")
            out += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
            out.append("")
    return "\n".join(out)


def base_config(run_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "daemon": {"log_level": "debug", "control_socket": str(run_dir / "control.sock"),
                   "drain_seconds": 1},
        "metrics": {"listen": "[::1]:9465"},
        "backbone": {"interface": "bb0"},
        "join": [{"interfaces": ["join*"], "modes": ["circuit"], "port": 8443}],
        "registrars": {"discovery": ["static"],
                       "static": [{"address": "fd4a:5044::100", "port": 8443,
                                   "preference": 10}],
                       "health_interval": 0.3, "health_timeout": 0.3},
        "announce": {"interval": 1, "mdns": False},
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **value}
        else:
            config[name] = value
    return config


class Notifications:
    """A NOTIFY_SOCKET the daemon writes to; path-based, so it works across namespaces."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.seen: list[str] = []

    def poll(self) -> list[str]:
        while self.sock.fileno() != -1:
            try:
                self.seen.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                break
        return self.seen

    def wait(self, prefix: str, timeout: float = 15) -> str:
        return wait_for(lambda: next((m for m in self.poll() if m.startswith(prefix)), None),
                        timeout, f"{prefix!r} on the notify socket")

    def close(self) -> None:
        self.poll()  # keep what the daemon said last (STOPPING=1)
        self.sock.close()


class ProxyDaemon:
    def __init__(self, lab: Lab, run_dir: Path, config: dict[str, Any],
                 host: Host | None = None, command: list[str] | None = None) -> None:
        self.lab = lab
        # how the daemon is started: this checkout's code by default, or e.g. a package's
        # payload (tests/test_ipk_payload.py)
        self.command = command or [PYTHON, "-m", "joinproxyd"]
        self.host = host or lab.proxy
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = run_dir / "joinproxyd.toml"
        self.write_config(config)
        self.process: LabProcess | None = None
        self.notify: Notifications | None = None

    def write_config(self, config: dict[str, Any]) -> None:
        self.config = config
        self.config_path.write_text(toml(config))

    def start(self, *, watchdog_usec: int | None = None, wait_ready: bool = True
              ) -> "ProxyDaemon":
        notify_path = self.run_dir / f"notify-{time.monotonic_ns()}"
        self.notify = Notifications(notify_path)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.process = self.host.spawn(
            [*self.command, "--config", str(self.config_path)],
            name="joinproxyd", env=env)
        if not wait_ready:  # the caller watches the notify socket itself
            return self
        try:
            self.notify.wait("READY=1")
        except Exception:
            raise AssertionError(f"joinproxyd did not get ready:\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.process.log() if self.process else ""

    def signal(self, sig: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, sig)

    def kill(self) -> None:
        assert self.process is not None
        self.process.signal(signal.SIGKILL)
        self.process.popen.wait(5)

    def stop(self) -> int | None:
        code = self.process.stop(timeout=15) if self.process else None
        if self.notify is not None:
            self.notify.close()
        return code

    def reload(self, config: dict[str, Any]) -> None:
        assert self.notify is not None
        before = len(self.notify.poll())
        self.write_config(config)
        self.signal(signal.SIGHUP)
        wait_for(lambda: any(m.startswith("READY=1") for m in self.notify.poll()[before:]), 10,
                 "READY=1 after the reload")

    def ctl(self, command: str = "status") -> Any:
        done = self.host.run([PYTHON, "-m", "joinproxyd.ctl", "--socket",
                              self.config["daemon"]["control_socket"], command, "--json"])
        return json.loads(done.stdout)

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        listen = self.config["metrics"]["listen"]
        done = self.host.run(["curl", "-sf", f"http://{listen}/metrics"])
        return {(sample.name, frozenset(sample.labels.items())): sample.value
                for family in text_string_to_metric_families(done.stdout)
                for sample in family.samples}

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def drops(self, mode: str, reason: str) -> float:
        return self.sample("joinproxyd_drops_total", mode=mode, reason=reason)

    def relay_counters(self, mode: str) -> "RelayCounters":
        """One relay mode's counters as /metrics shows them (the one place that names them)."""
        metrics = self.metrics()

        def get(name: str, **labels: str) -> int:
            return int(metrics.get((name, frozenset({"mode": mode, **labels}.items())), 0))
        drops = {dict(labels)["reason"]: int(value)
                 for (name, labels), value in metrics.items()
                 if name == "joinproxyd_drops_total" and dict(labels).get("mode") == mode
                 and value}
        return RelayCounters(
            mode=mode,
            datagrams_up=get("joinproxyd_relayed_datagrams_total", direction="upstream"),
            datagrams_down=get("joinproxyd_relayed_datagrams_total", direction="downstream"),
            bytes_up=get("joinproxyd_relayed_bytes_total", direction="upstream"),
            bytes_down=get("joinproxyd_relayed_bytes_total", direction="downstream"),
            flows=get("joinproxyd_circuits_total"), drops=drops)


@dataclass(frozen=True)
class RelayCounters:
    """What a relay mode did: datagrams and bytes each way (upstream: pledge to registrar),
    flows opened (the stateful modes; 0 for a stateless one) and drops by reason."""

    mode: str
    datagrams_up: int
    datagrams_down: int
    bytes_up: int
    bytes_down: int
    flows: int
    drops: dict[str, int]

    def line(self) -> str:
        drops = ", ".join(f"{k} {v}" for k, v in sorted(self.drops.items())) or "none"
        return (f"{self.mode:<6} datagrams {self.datagrams_up} up / {self.datagrams_down} down, "
                f"bytes {self.bytes_up} up / {self.bytes_down} down, flows {self.flows}, "
                f"drops: {drops}")


def echo_registrar(host: Host, name: str, port: int = 8443) -> LabProcess:
    """A stand-in registrar that says its name, then echoes: enough to see where circuits go."""
    return host.spawn(["socat", f"TCP6-LISTEN:{port},fork,reuseaddr",
                       f"SYSTEM:echo {name}; exec cat"], name=f"echo-{name}")


def hold_circuit(pledge: Host, name: str = "holder", port: int = 8443) -> LabProcess:
    """A circuit that stays open and silent (stdin never ends): a slowloris, or a pledge
    still in the middle of its enrollment."""
    return pledge.spawn(["sh", "-c", f"sleep 600 | exec socat - TCP6:[fe80::1%eth0]:{port}"],
                        name=name)


def talk(pledge: Host, message: str = "hello", port: int = 8443, timeout: float = 3
         ) -> str:
    """Connect from a pledge to the proxy's join port, send a line, return what came back."""
    done = pledge.run(["socat", f"-t{timeout}", "-T", str(timeout), "-",
                       f"TCP6:[fe80::1%eth0]:{port}"], input=message + "\n", check=False,
                      timeout=timeout + 10)
    return done.stdout
