"""Discovery in both directions, each part driven by the control plane (daemon.py).

    registrars.py  RegistrarSet: static + discovered registrars, TCP health probes, the
                   active one (sans-IO RegistrarTable inside, tested with a fake clock)
    grasp.py       GraspRegistrarListener: AN_join_registrar floods heard on the backbone
    mdns.py        MdnsRegistrarBrowser (backbone) and MdnsProxyAdvertiser (join links)
    announce.py    ProxyAnnouncer: AN_Proxy floods on the join links while joining is open
    peerlog.py     rate-limited warnings about misbehaving peers

Wire formats come from brski.grasp and python-zeroconf; nothing here encodes GRASP by hand.
Everything a peer sends is counted and dropped when unusable, never raised.
"""
