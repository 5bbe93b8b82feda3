"""Bookkeeping of lab runs, so that a run killed with SIGKILL is cleaned by the next one.

Each run owns a directory under /run/joinproxy-lab/<run-id>/ holding `state.json`: the
namespaces it made, the PIDs it started, and its owner process (PID and start time, so a
reused PID is not mistaken for a live owner). The state is written *before* anything is
created, so no namespace of ours can exist without a record. A run is stale when its owner is
gone and it was not made to outlive its owner (`joinproxy-lab up`).
"""

import contextlib
import json
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import netns

RUNS_DIR = Path("/run/joinproxy-lab")
NS_PREFIX = "jpl"


def process_start_time(pid: int) -> int | None:
    """Kernel start time of a process (clock ticks since boot), None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass
class RunState:
    run_id: str
    owner_pid: int
    owner_start: int
    persistent: bool = False
    namespaces: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    topology: dict = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return RUNS_DIR / self.run_id

    def save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(self.directory / "state.json")

    @classmethod
    def load(cls, directory: Path) -> "RunState | None":
        try:
            return cls(**json.loads((directory / "state.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def owner_alive(self) -> bool:
        return process_start_time(self.owner_pid) == self.owner_start


def all_runs() -> list[RunState]:
    if not RUNS_DIR.is_dir():
        return []
    runs = []
    for directory in sorted(RUNS_DIR.iterdir()):
        state = RunState.load(directory)
        if state is not None:
            runs.append(state)
    return runs


def _signal_pid(pid: int, start: int | None, sig: int) -> None:
    # Only a process we recorded, and only while it is still that same process.
    if start is not None and process_start_time(pid) == start:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def kill_namespace_processes(namespaces: list[str], timeout: float = 3) -> None:
    """End every process still running in these namespaces (all were started by the lab)."""
    victims = {
        pid: process_start_time(pid) for ns in namespaces for pid in netns.namespace_pids(ns)
    }
    for pid, start in victims.items():
        _signal_pid(pid, start, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(process_start_time(pid) != start for pid, start in victims.items()):
            return
        time.sleep(0.05)
    for pid, start in victims.items():
        _signal_pid(pid, start, signal.SIGKILL)


def destroy(state: RunState) -> None:
    """Remove everything a run made: its processes, namespaces (with their links) and record."""
    kill_namespace_processes(state.namespaces)
    for ns in state.namespaces:
        netns.delete_namespace(ns)
    shutil.rmtree(state.directory, ignore_errors=True)


def clean_stale() -> list[str]:
    """Remove runs whose owner died, and namespaces of ours that no run owns. Returns run ids."""
    cleaned = []
    live_prefixes = []
    for state in all_runs():
        if state.persistent or state.owner_alive():
            live_prefixes.append(f"{NS_PREFIX}{state.run_id}-")
            continue
        destroy(state)
        cleaned.append(state.run_id)
    if RUNS_DIR.is_dir():
        for directory in RUNS_DIR.iterdir():
            if directory.is_dir() and RunState.load(directory) is None:
                # A directory without a readable record: made by a run killed while saving.
                age = time.time() - directory.stat().st_mtime
                if age > 60:
                    shutil.rmtree(directory, ignore_errors=True)
    orphans = [
        ns for ns in netns.list_namespaces()
        if ns.startswith(NS_PREFIX) and "-" in ns
        and not any(ns.startswith(prefix) for prefix in live_prefixes)
        and not (RUNS_DIR / ns[len(NS_PREFIX):].split("-", 1)[0]).exists()
    ]
    if orphans:
        kill_namespace_processes(orphans)
        for ns in orphans:
            netns.delete_namespace(ns)
        cleaned.extend(sorted({ns[len(NS_PREFIX):].split("-", 1)[0] for ns in orphans}))
    return cleaned
