#!/bin/sh
# Runs inside the stock-Debian-kernel VM (make test-vm): the ipip relay mode itself
# (relays/ipip.py, ipip.datapath = "kernel") between three namespaces, no BPF anywhere:
#
#   pledge p (fe80::1:1) ── join0 ─ proxy x ─ bb0 ── registrar r (fd00::100; its own ip6ip6
#                                                        tunnel t0, link-local R_ll fe80::2)
#
# Then, in the same boot (one VM less for CI), a whole enrollment through the mode's kernel
# tunnel with the project's real processes (ipip_enroll_check.py, its own namespaces), run
# from the repository and its .venv that test-vm.sh shares read-only (9p tag "repo").
# Exit status: the number of failed checks (the check scripts say which).
export PYTHONPATH=/job/py PYTHONDONTWRITEBYTECODE=1
modprobe -a ip6_tunnel veth act_mirred cls_u32 sch_ingress nft_fwd_netdev || exit 90
for n in p x r; do
    ip netns add $n || exit 91
    ip netns exec $n sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
    ip -n $n link set lo up
done
ip link add eth0 netns p type veth peer name join0 netns x &&
ip link add bb0 netns x type veth peer name eth0 netns r &&
ip -n p link set eth0 up && ip -n x link set join0 up && ip -n x link set bb0 up &&
ip -n r link set eth0 up &&
ip -n p addr add fe80::1:1/64 dev eth0 nodad &&
# a real pledge's frames carry finished checksums; a veth's would be left to fill in later
# (CHECKSUM_PARTIAL), as lab/topology.py says
ip netns exec p ethtool -K eth0 tx off >/dev/null &&
ip -n x addr add fe80::1/64 dev join0 nodad &&
ip -n x addr add fd00::1/64 dev bb0 nodad &&  # (the mode adds its fd00::11)
ip -n r addr add fd00::100/64 dev eth0 nodad &&
ip -n r link add t0 type ip6tnl mode ip6ip6 local fd00::100 remote fd00::11 encaplimit none &&
ip -n r link set t0 up && ip -n r addr add fe80::2/64 dev t0 nodad || exit 92
ip netns exec x python3 /job/ipip_mode_check.py
failed=$?
for n in p x r; do ip netns del $n; done
# the repository and its .venv's packages on the guest's own python3 (both Debian 12's 3.11)
mount -t tmpfs tmpfs /mnt && mkdir /mnt/repo &&
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro repo /mnt/repo || exit 93
modprobe -a tun bridge || exit 94
PYTHONPATH=/mnt/repo:/mnt/repo/daemon:/mnt/repo/.venv/lib/python3.11/site-packages \
    python3 /mnt/repo/tests/vm/ipip_enroll_check.py
exit $((failed + $?))
