"""joinproxyctl: ask a running joinproxyd what it is doing.

    joinproxyctl [--socket PATH] status [--json]
    joinproxyctl [--socket PATH] circuits [--json]
    joinproxyctl [--socket PATH] window [open|close] [--json]
    joinproxyctl [--socket PATH] refusals [--pledge ADDRESS] [--json]
    joinproxyctl [--socket PATH] drop CIRCUIT [--json]
    joinproxyctl [--socket PATH] trace [PLEDGE] [--json]
"""

import argparse
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .config import Config

DEFAULT_SOCKET = Config.__dataclass_fields__["control_socket"].default


class CtlError(Exception):
    pass


def request(path: Path, command: str, timeout: float = 5,
            args: dict[str, Any] | None = None) -> Any:
    message: dict[str, Any] = {"command": command}
    if args:
        message["args"] = args
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError:
        raise CtlError(f"{path}: no such socket; is joinproxyd running?") from None
    except PermissionError:
        raise CtlError(f"{path}: permission denied; run as root") from None
    except OSError as exc:
        raise CtlError(f"{path}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise CtlError(f"{path}: the daemon sent an unreadable reply") from None
    if not reply.get("ok"):
        raise CtlError(f"the daemon refused: {reply.get('error', 'no reason given')}")
    return reply[command]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in rows)


def render_status(status: dict[str, Any]) -> str:
    backbone = status["backbone"]
    joining = ("joining open" if status["joining"] else
               f"joining CLOSED ({status.get('joining_reason', 'no healthy registrar')})")
    window = status.get("join_window")  # absent from a daemon older than the window
    out = [f"joinproxyd {status['version']}, up {status['uptime']:.0f} s, {joining}"
           + ("" if status.get("ready", True) else ", NOT READY (listeners not bound)"),
           *([render_window(window)] if window else []),
           *render_joining_modes(status.get("joining_modes")),
           f"backbone: {backbone['name']} "
           + ("(ready)" if backbone["ready"] else
              f"(NOT READY: {backbone.get('problem') or 'not usable'}"
              + "".join(f"; {s}" for s in backbone.get("stops", ())) + ")"), "",
           "join interfaces:"]
    # "announced": where pledges are told to connect (an ipip link names the registrar's
    # link-local address; nothing while no mode of the link can serve them)
    rows = [["interface", "address", "port", "modes", "announced"]]
    rows += [[i["name"], i["link_local"], str(i["port"]), ",".join(i["modes"]),
              ",".join(i.get("announce", [])) or "-"] for i in status["interfaces"]]
    out.append(_table(rows) if len(rows) > 1 else "  (none)")
    # configured but not served (or served by fewer modes than configured), and why
    problems = [f"  {i['name']}: {why}" for i in status["interfaces"]
                for why in i.get("not_serving", {}).values()]
    problems += [f"  {u['name']} ({','.join(u['modes'])}): NOT SERVED: {u['reason']}"
                 for u in status.get("unserved", ())]
    problems += [f"  {e['mode']}: cannot listen on {e['address']}: {e['error']} "
                 f"({e['attempts']} attempts, next in {e['retry_in']:g} s)"
                 for e in status.get("listener_errors", ()) if not e["interface"]]
    if problems:
        out += ["", "not served:", *problems]
    out += ["", "registrars:"]
    rows = [["registrar", "source", "pref", "healthy", "active"]]
    rows += [[f"[{r['address']}]:{r['port']}"
              + (f" coaps {r['coaps_port']}" if r.get("coaps_port") else ""),
              r["source"], str(r["preference"]),
              "yes" if r["healthy"] else "no", "*" if r["active"] else ""]
             for r in status["registrars"]]
    out += [_table(rows) if len(rows) > 1 else "  (none)"]
    out += render_constrained(status.get("constrained_registrars"))
    out += ["", "relays:"]
    for mode, info in status["relays"].items():
        out.append(f"  {mode}: {json.dumps(info, sort_keys=True)}")
    out += render_traffic(status.get("traffic"))
    out += render_bpf(status.get("guard"), status.get("bpf"))
    counters = status["counters"]
    out += ["", "counters (not zero; --json shows all):"]
    out += [f"  {name} {value:g}" for name, value in sorted(counters.items()) if value]
    return "\n".join(out)


def render_joining_modes(modes: dict[str, Any] | None) -> list[str]:
    """One line per configured mode: open (via which registrar) or closed and why; absent
    from an older daemon."""
    if not modes:
        return []
    parts = [f"{name} open via {m['registrar']}" if m["open"]
             else f"{name} CLOSED ({m['reason']})" for name, m in sorted(modes.items())]
    return ["modes: " + "; ".join(parts)]


def render_traffic(traffic: dict[str, Any] | None) -> list[str]:
    """Per mode: flows open/opened, datagrams and bytes up/down, drops by reason."""
    if not traffic:
        return []

    def pair(d: dict[str, int] | None) -> str:
        return "-" if d is None else f"{d.get('upstream', 0)}/{d.get('downstream', 0)}"

    rows = [["mode", "flows open/opened", "datagrams up/down", "bytes up/down", "drops"]]
    for mode, t in sorted(traffic.items()):
        flows = t.get("flows")
        active = "-" if flows is None or flows.get("active") is None else flows["active"]
        rows.append([mode, "-" if flows is None else f"{active}/{flows['opened']}",
                     pair(t.get("datagrams")), pair(t.get("bytes")),
                     ",".join(f"{r}={n}" for r, n in sorted(t["drops"].items())) or "-"])
    return ["", "traffic:", _table(rows)]


def render_constrained(info: dict[str, Any] | None) -> list[str]:
    """Registrars' UDP endpoints (coaps, jpy: DTLS probe; cojp: CoAP ping) and their health;
    absent: older daemon."""
    if not info or not info.get("endpoints"):
        return []
    chosen = info.get("chosen") or {}
    rows = [["endpoint", "sources", "healthy", "error", "in use"]]
    for e in info["endpoints"]:
        # "used": what its kind's relay is given (a JRC on another host too); older daemons
        # say only which registrar coaps/jpy chose.
        used = e["used"] if "used" in e else (e["address"] == chosen.get("address")
                                               and e["port"] == chosen.get(f"{e['kind']}_port"))
        rows.append([f"{e['kind']}://[{e['address']}]:{e['port']}", ",".join(e["sources"]),
                     {True: "yes", False: "no", None: "?"}[e["healthy"]],
                     e.get("last_error") or "", "*" if used else ""])
    mode = info.get("mode") or "none (no healthy one)"
    return ["", f"constrained registrars (mode {mode}, setting {info['mode_setting']}):",
            _table(rows)]


def render_bpf(guard: dict[str, Any] | None, bpf: dict[str, Any] | None) -> list[str]:
    """The join-port guard and the BPF programs: where they are attached, what they did."""
    out = [""]
    if guard is None or not guard.get("enabled"):
        # with the IPIP fast path on, its program stays on the ipip links as the dispatcher
        links = ", ".join(guard.get("interfaces") or ()) if guard else ""
        out.append("guard: off" + (f" (its program stays on {links} to start the XDP "
                                   "encapsulation, limiting nothing)" if links else ""))
    elif guard.get("running") is False and not guard["interfaces"]:
        out.append(f"guard: NOT RUNNING: {guard.get('error') or 'no reason given'}")
    else:
        links = ", ".join(f"{name} ({mode})" for name, mode in guard["interfaces"].items())
        rates = (f"per source UDP {guard['rate']} datagrams/s burst {guard['burst']}, TCP "
                 f"{guard['syn_rate']} SYNs/s burst {guard['syn_burst']}"
                 if "syn_rate" in guard else  # a daemon from before SYNs had their own rate
                 f"{guard['rate']} packets/s per source, burst {guard['burst']}")
        out.append(f"guard: {rates}, "
                   f"ports {','.join(map(str, guard['ports'])) or 'none'} on "
                   f"{links or 'no link'}" + (f"; ERROR {guard['error']}"
                                              if guard.get("error") else ""))
        out += [f"  dropped {entry['drops']} {entry['protocol']} from {entry['source']} on "
                f"{entry['interface']}" for entry in guard.get("dropped_most") or ()]
    if bpf is None:
        out.append("BPF data plane: not loaded")
        return out
    out += [f"BPF data plane (maps pinned in {bpf['pin_dir']}):"]
    rows = [["hook", "ifindex", "program", "mode"]]
    rows += [[a["hook"], str(a["ifindex"]), a["program"], a["mode"]] for a in bpf["attached"]]
    out.append(_table(rows) if len(rows) > 1 else "  (nothing attached)")
    # Packets by program and action: every action a program has taken at least once.
    by_program: dict[str, list[str]] = {}
    for key, value in sorted(bpf["counters"].items()):
        program, action = key.split("/", 1)
        if value:
            by_program.setdefault(program, []).append(f"{action} {value}")
    out.append("BPF packets:" if by_program else "BPF packets: none yet")
    out += [f"  {program}: {', '.join(actions)}" for program, actions in sorted(
        by_program.items())]
    return out


def render_circuits(circuits: list[dict[str, Any]]) -> str:
    if not circuits:
        return "no open circuits"
    # nat66 flows (the kernel's) have no id and no byte counts: "-"
    # path: where a circuit's bytes move ("splice": the kernel's sockhash; "asyncio")
    rows = [["id", "mode", "interface", "pledge", "registrar", "seconds", "up", "down",
             "path"]]
    rows += [[str(c.get("id", "-")), c["mode"], str(c.get("interface") or "-"), c["pledge"],
              c["registrar"], f"{c['seconds']:.1f}" if "seconds" in c else "-",
              str(c.get("bytes_up", "-")), str(c.get("bytes_down", "-")),
              str(c.get("datapath", "-"))] for c in circuits]
    return _table(rows)


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def render_window(window: dict[str, Any]) -> str:
    return (f"join window: {window['state']} (since {_when(window['since'])}, "
            f"by {window['by']})")


def render_refusals(groups: list[dict[str, Any]]) -> str:
    if not groups:
        return "no refusals recorded"
    rows = [["pledge", "interface", "mode", "count", "last reason", "last time", "reasons"]]
    rows += [[g["pledge"], g["interface"], g["mode"], str(g["count"]), g["last_reason"],
              _when(g["last_time"]),
              ",".join(f"{r}={n}" for r, n in sorted(g["reasons"].items()))] for g in groups]
    return _table(rows)


def render_dropped(circuits: list[dict[str, Any]]) -> str:
    return "\n".join(f"dropped circuit {c['id']} {c['pledge']} -> {c['registrar']} on "
                     f"{c['interface']}" for c in circuits)


def build_parser() -> argparse.ArgumentParser:
    """The command line; also what packaging/completion/joinproxyctl is checked against."""
    parser = argparse.ArgumentParser(prog="joinproxyctl", description=__doc__.split("\n")[0])
    parser.add_argument("--socket", type=Path, default=DEFAULT_SOCKET,
                        help=f"the daemon's control socket (default {DEFAULT_SOCKET})")
    parser.add_argument("--version", action="version", version=f"joinproxyctl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "status": "what the daemon serves, its registrars, relays and counters",
        "circuits": "open circuits, nat66 and coaps flows, with the ids drop takes",
        "window": "show, open or close the join window (closed: new pledges are refused)",
        "refusals": "recent refusals per pledge, with their reason",
        "drop": "close an open circuit, by id or by pledge address",
        "trace": "live drop reasons (kernel, our programs, refusals) until Ctrl-C",
    }
    for name, text in commands.items():
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("--json", action="store_true", help="print the raw JSON")
        if name == "window":
            cmd.add_argument("state", nargs="?", choices=("open", "close"),
                             help="open or close it (without: show it)")
        elif name == "refusals":
            cmd.add_argument("--pledge", metavar="ADDRESS",
                             help="only this pledge address (any scope or port)")
        elif name == "drop":
            cmd.add_argument("circuit", metavar="CIRCUIT",
                             help="a circuit id from `circuits`, or a pledge address")
        elif name == "trace":
            cmd.add_argument("pledge", metavar="PLEDGE", nargs="?",
                             help="only this pledge address (default: every pledge)")
    return parser


def trace(path: Path, pledge: str | None, as_json: bool) -> int:
    """Print the daemon's drop events until Ctrl-C (closing the socket ends the trace
    and, if it was the last, detaches the tracer)."""
    from .trace import render_event  # only this command needs it

    message: dict[str, Any] = {"command": "trace", "args": {"pledge": pledge} if pledge else {}}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.settimeout(5)
                sock.connect(str(path))
                sock.sendall(json.dumps(message).encode() + b"\n")
                stream = sock.makefile("rb")
                sock.settimeout(None)
                first = stream.readline()
            except FileNotFoundError:
                raise CtlError(f"{path}: no such socket; is joinproxyd running?") from None
            except PermissionError:
                raise CtlError(f"{path}: permission denied; run as root") from None
            except OSError as exc:
                raise CtlError(f"{path}: {exc.strerror or exc}") from None
            try:
                reply = json.loads(first)
            except ValueError:
                raise CtlError(f"{path}: the daemon sent an unreadable reply") from None
            if not reply.get("ok"):
                raise CtlError(f"the daemon refused: {reply.get('error', 'no reason given')}")
            head = reply["trace"]
            if as_json:
                print(json.dumps(head), flush=True)
            else:
                print(f"tracing drops of {head.get('pledge') or 'every pledge'} on "
                      f"{', '.join(head.get('links', [])) or 'no link'}; Ctrl-C to stop",
                      flush=True)
            for line in stream:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                print(json.dumps(event) if as_json else render_event(event), flush=True)
    except KeyboardInterrupt:
        return 0
    except CtlError as exc:
        print(f"joinproxyctl: {exc}", file=sys.stderr)
        return 1
    print("joinproxyctl: the daemon ended the trace", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "trace":
        return trace(args.socket, args.pledge, args.json)
    call: dict[str, Any] = {}
    if args.command == "window" and args.state:
        call["state"] = args.state
    elif args.command == "refusals" and args.pledge:
        call["pledge"] = args.pledge
    elif args.command == "drop":
        call["circuit"] = args.circuit
    try:
        result = request(args.socket, args.command, args=call)
    except CtlError as exc:
        print(f"joinproxyctl: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif args.command == "status":
        print(render_status(result))
    elif args.command == "window":
        print(render_window(result) + ("" if result["joining"] else
                                        f"; joining closed: {result['joining_reason']}"))
    elif args.command == "refusals":
        print(render_refusals(result))
    elif args.command == "drop":
        print(render_dropped(result))
    else:
        print(render_circuits(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
