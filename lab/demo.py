"""The demo behind `make demo`: a lab topology, shown and checked, then removed.

Later work turns this into a real enrollment through joinproxyd.
"""

from .topology import PROXY_LL, Lab, Topology


def run() -> int:
    with Lab(Topology(pledges=5, registrars=1)) as lab:
        print(lab.describe())
        pledge = lab.pledges[0]
        done = pledge.run(["ping", "-6", "-c", "1", "-W", "2", f"{PROXY_LL}%eth0"], check=False)
        print(f"pledge0 -> proxy {PROXY_LL}: {'reachable' if done.returncode == 0 else 'FAILED'}")
        registrar = lab.registrars[0].address("eth0", link_local=False)
        blocked = pledge.run(["ping", "-6", "-c", "1", "-W", "1", registrar], check=False)
        print(f"pledge0 -> registrar {registrar}: "
              f"{'unreachable, as it must be' if blocked.returncode != 0 else 'REACHABLE (bad)'}")
        ok = done.returncode == 0 and blocked.returncode != 0
    print("lab removed")
    return 0 if ok else 1
