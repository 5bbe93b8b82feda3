"""Discovery in both directions, each part driven by the control plane (daemon.py).

    registry.py    RegistrarTable: known registrars, their origins and health, the choice
                   (plain data, time passed in, tested with a fake clock)
    registrars.py  RegistrarSet: the asyncio side: TCP health probes, expiry, on_change
    grasp.py       GraspRegistrarListener: AN_join_registrar floods heard on the backbone
    mdns.py        MdnsRegistrarBrowser (backbone) and MdnsProxyAdvertiser (join links)
    announce.py    ProxyAnnouncer: AN_Proxy floods on the join links while joining is open
    peerlog.py     rate-limited warnings about misbehaving peers
    target.py      AnnounceTarget: what an announcement on one join link says

Wire formats come from brski.grasp and python-zeroconf; nothing here encodes GRASP by hand.
Everything a peer sends is counted and dropped when unusable, never raised.
"""
