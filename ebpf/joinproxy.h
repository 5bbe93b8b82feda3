/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * joinproxy.h: everything the BPF programs and their one userspace owner
 * (daemon/joinproxyd/kernel/bpf.py) share: enums, map keys and values, config structs.
 * Their Python side is daemon/joinproxyd/kernel/bpf_layout.py.
 *
 * Rules (style-models.md, habits 6-8):
 * - every enum member has an explicit value; tests/test_bpf_structs.py parses this file and
 *   checks the values against the Python enums, so a reordering fails a test, not a dashboard;
 * - every struct here has a ctypes mirror in bpf_layout.py whose size and offsets are checked
 *   against the BTF of the compiled objects;
 * - addresses are kept as 16 raw bytes in network order (no struct in6_addr unions), so the
 *   BTF and the ctypes mirror stay trivially comparable;
 * - ports are host order (the programs convert the packet's port once).
 */
#ifndef JOINPROXY_H
#define JOINPROXY_H

#include <linux/types.h>

/* Why a packet was dropped. Mirror of joinproxyd.model.DropReason in the same order: the
 * value is the member's position in that enum. Only some of them can happen in the kernel
 * (marked K); the others exist so both sides keep one numbering. */
enum jp_drop_reason {
	JP_DROP_NO_REGISTRAR = 0,		/* K: IPIP from a source not in jp_registrars */
	JP_DROP_RATE_LIMIT = 1,			/* K: guard: over the per-source token bucket */
	JP_DROP_LIMIT_TOTAL = 2,
	JP_DROP_LIMIT_INTERFACE = 3,
	JP_DROP_LIMIT_PLEDGE = 4,
	JP_DROP_REGISTRAR_UNREACHABLE = 5,
	JP_DROP_IDLE_TIMEOUT = 6,
	JP_DROP_LIFETIME = 7,
	JP_DROP_MALFORMED = 8,			/* K: lengths lie, L4 header cut short */
	JP_DROP_OVERSIZED = 9,			/* K: does not fit the egress MTU once (de)capsulated */
	JP_DROP_BAD_HEADER = 10,		/* K: IPIP inner packet not IPv6 / not link-local */
	JP_DROP_TABLE_FULL = 11,		/* K: guard: no bucket could be stored */
	JP_DROP_IRRELEVANT = 12,
	JP_DROP_SEND_ERROR = 13,		/* K: the kernel refused to grow/shrink the packet */
	JP_DROP_NOT_TO_REGISTRAR = 14,
	JP_DROP_UNSOLICITED = 15,
	JP_DROP_SHUTDOWN = 16,
	JP_DROP_RESOURCES = 17,
	JP_DROP__COUNT = 18,
};

/* What a program did with a packet. Mirror of bpf.Action. */
enum jp_action {
	JP_ACT_PASS = 0,	/* left to the stack untouched */
	JP_ACT_ENCAP = 1,	/* IPIP: encapsulated and redirected to the backbone */
	JP_ACT_DECAP = 2,	/* IPIP: decapsulated and redirected to its join link */
	JP_ACT_ALLOW = 3,	/* guard: to a join port, let through (within the rate, or
				 * a TCP segment of a connection, which is never rationed) */
	JP_ACT_FALLBACK = 4,	/* XDP encap: next hop not resolved, left to the tc program */
	JP_ACT_REDIRECT = 5,	/* bare redirect baseline */
	JP_ACT_DROP = 6,	/* dropped; the reason is counted in drop[] too */
	JP_ACT_TOO_BIG = 7,	/* IPIP: too big to relay, answered with ICMPv6 Packet Too Big;
				 * counted in drop[] as oversized too */
	JP_ACT__COUNT = 8,
};

/* Which program counted: the key of jp_counters. Mirror of bpf.Program. */
enum jp_prog {
	JP_PROG_TC_JOIN = 0,		/* jp_tc_join: tc ingress of a join link, encapsulates */
	JP_PROG_TC_BACKBONE = 1,	/* jp_tc_backbone: tc ingress of the backbone, decapsulates */
	JP_PROG_XDP_JOIN = 2,		/* jp_xdp_join: XDP variant of the encapsulation */
	JP_PROG_GUARD = 3,		/* jp_guard: XDP join-port rate guard */
	JP_PROG_BARE_REDIRECT = 4,	/* jp_bare_redir: benchmark baseline */
	JP_PROG_BARE_PUSH = 5,		/* jp_bare_push: benchmark floor of any encapsulation */
	JP_PROG_JPY_JOIN = 6,		/* jp_jpy_join: tc ingress of a join link, JPY wrap */
	JP_PROG_JPY_BACKBONE = 7,	/* jp_jpy_backbone: tc ingress of the backbone, unwrap */
	JP_PROG_JPY_SETKEY = 8,		/* jp_jpy_setkey: syscall, creates the AES contexts */
	JP_PROG_BARE_TC = 9,		/* jp_bare_tc: tc benchmark baseline, redirect */
	JP_PROG_JPY_XDP_JOIN = 10,	/* jp_jpy_xdp_join: XDP variant of the JPY wrap */
	JP_PROG__COUNT = 11,
};

/* jp_counters (PERCPU_ARRAY, key enum jp_prog): one row per program, one named slot per
 * action and per drop reason. Userspace sums the rows over CPUs; only the kernel writes. */
struct jp_counters {
	__u64 action[JP_ACT__COUNT];
	__u64 drop[JP_DROP__COUNT];
};

#define JP_MAX_PORTS 4
#define JP_MAX_JOIN_LINKS 256	/* entries of jp_join_cfg and jp_bb_addrs */
#define JP_GUARD_MAX_PORTS 8

/* IPIP protocol numbers: 41 is IPv6-in-IPv6 (RFC 2473, what the BRSKI drafts say), 98 is
 * ENCAP (RFC 1241, named by the enrollment roadmap). */
#define JP_IPPROTO_IPV6 41
#define JP_IPPROTO_ENCAP 98

/* jp_join_cfg (HASH, key: __u32 join ifindex): one entry per join link served by IPIP. */
struct jp_join_cfg {
	__u8 registrar_ll[16];	/* the link-local address announced to pledges (proxy ND) */
	__u8 outer_src[16];	/* the proxy's backbone address for this join link */
	__u8 outer_dst[16];	/* the registrar's backbone (ACP) address */
	__u32 backbone_ifindex;
	__u16 ports[JP_MAX_PORTS];	/* TCP/UDP destination ports relayed; 0 = unused */
	__u8 proto;		/* outer next header: 41 or 98 */
	__u8 pad[3];
};

/* jp_ipip_gen (ARRAY, one entry): bumped by bpf.py after every change of jp_join_cfg, so the
 * programs drop their cached copies (jp_encap_cache) at once. It starts at random in each
 * process, so a pinned cache written for a killed daemon's configuration never matches. */
struct jp_ipip_gen {
	__u32 generation;
};

/* jp_encap_cache (PERCPU_ARRAY, JP_ENCAP_SLOTS entries, index ifindex % JP_ENCAP_SLOTS):
 * everything the join programs need per packet, in one place per CPU and join link: the
 * match (registrar_ll, ports), the finished Ethernet and outer IPv6 header with the next
 * hop's MACs (bpf_fib_lookup's answer, kept JP_NH_TTL_NS), the egress and the route MTU.
 * A hash lookup of jp_join_cfg, the header build and the FIB lookup cost more than the
 * rest of the XDP encapsulation together; this way a packet pays two inlined array lookups
 * and a header copy. Direct-mapped: links whose ifindexes are equal modulo JP_ENCAP_SLOTS
 * evict each other (still correct, only slower). Written by the kernel only; per CPU, so
 * without races. A link without IPIP configuration is cached too (backbone 0): its packets
 * pass after the same two lookups. */
#define JP_ENCAP_SLOTS 256	/* a power of two */
#define JP_ENCAP_HDR 56		/* 2 bytes padding, Ethernet (14), outer IPv6 (40) */
#define JP_ENCAP_ETH 2		/* offsets in hdr[]: the IPv6 header is 8-byte aligned */
#define JP_ENCAP_IP6 16
#define JP_NEVER (~0ULL)

struct jp_encap {
	__u32 ifindex;		/* tag: the join link this entry is for; 0 = empty */
	__u32 generation;	/* jp_ipip_gen it was built for */
	__u64 expires;		/* bpf_ktime_get_coarse_ns() when the next hop is looked up again */
	__u32 backbone;		/* jp_join_cfg.backbone_ifindex; 0 = link not configured */
	__u32 egress;		/* where the FIB sends the outer packet; 0 = no next hop yet */
	__u32 mtu;		/* route MTU towards the registrar */
	__u32 tick;		/* low 32 bits of jiffies when the clock was last read */
	__u16 ports[JP_MAX_PORTS];	/* network order; unused slots repeat ports[0] */
	__u8 registrar_ll[16];
	__u8 hdr[JP_ENCAP_HDR];	/* payload length 0, filled in per packet */
};

/* A neighbour change is seen within this. Both programs read the coarse clock (tick
 * resolution): bpf_ktime_get_ns() reads the TSC, which cost a third of the XDP encapsulation
 * on a VM, and neither a cache lifetime nor a token bucket needs better than a tick. */
#define JP_NH_TTL_NS 100000000ULL

/* A raw IPv6 address as a map key (jp_bb_addrs, jp_registrars). */
struct jp_addr {
	__u8 addr[16];
};

/* jp_bb_addrs (HASH, key struct jp_addr = the outer destination): which join link an IPIP
 * packet from the registrar belongs to. */
struct jp_bb_addr {
	__u32 join_ifindex;
};

/* jp_registrars (HASH, key struct jp_addr = outer source): registrars allowed to send IPIP. */
struct jp_registrar {
	__u32 flags;	/* reserved, 0 */
};

/* jp_guard_cfg (ARRAY, one entry). UDP datagrams and TCP SYNs (new connections) have
 * buckets and rates of their own; other TCP segments are not rationed. */
struct jp_guard_cfg {
	__u64 rate_pps;		/* UDP datagrams per second; 0 turns the whole guard off */
	__u64 burst;		/* UDP bucket depth in datagrams (>= 1 when rate_pps > 0) */
	__u16 ports[JP_GUARD_MAX_PORTS];	/* join ports, TCP and UDP; 0 = unused */
	__u64 syn_rate_pps;	/* TCP SYNs (without ACK) per second; 0: SYNs not limited */
	__u64 syn_burst;	/* SYN bucket depth (>= 1 when syn_rate_pps > 0) */
};

/* jp_guard_bkt (LRU_HASH): one token bucket per (source, ingress interface, protocol). IPv4
 * sources are stored v4-mapped (::ffff:a.b.c.d) so one key type serves both families. */
struct jp_guard_key {
	__u8 addr[16];
	__u32 ifindex;
	__u8 proto;	/* IPPROTO_TCP (SYN bucket) or IPPROTO_UDP */
	__u8 pad[3];	/* zero */
};

/* Tokens are fixed point: JP_TOKEN_ONE units make one packet, so refill is
 * elapsed_ns * rate_pps with no division and no floats. */
#define JP_TOKEN_ONE 1000000000ULL

struct jp_guard_bucket {
	__u64 tokens;	/* in 1/JP_TOKEN_ONE packets */
	__u64 last_ns;	/* bpf_ktime_get_coarse_ns() of the last refill */
	__u64 drops;	/* packets this source lost to the bucket: who is flooding */
};

/* jp_bare_cfg (ARRAY, one entry): the baseline's target; 0 makes it a counting sink. */
struct jp_bare_cfg {
	__u32 ifindex;
};

/* ---- the JPY relay in tc (jpy.bpf.c; daemon side: kernel/bpf_jpy.py) ---- */

/* The largest pledge datagram the kernel wraps: IPv6 minimum MTU - 40 - 8 - 38 (CBOR and
 * header), as relays/jpy.py MAX_PLEDGE_DATAGRAM. */
#define JP_JPY_MAX_CONTENT 1194

/* jp_jpy_cfg (ARRAY, one entry): where wrapped datagrams go and come from. */
struct jp_jpy_cfg {
	__u8 backbone_addr[16];	/* our source address towards the registrar */
	__u8 registrar_addr[16];
	__u32 backbone_ifindex;	/* 0: no registrar, nothing is relayed in the kernel */
	__u32 current_slot;	/* jp_jpy_keys index that seals (0 or 1) */
	__u16 src_port;		/* our JPY source port (the daemon's socket holds it) */
	__u16 registrar_port;	/* the registrar's JPY port */
	__u16 max_content;	/* larger pledge datagrams: dropped, too-big */
	__u16 pad;
};

/* jp_jpy_links (HASH, key __u32 join ifindex): a join link served by the kernel path. */
struct jp_jpy_link {
	__u8 addr[16];		/* the link's link-local address pledges send to */
	__u16 port;		/* the join port */
	__u8 relay;		/* 0: join window closed, pledge datagrams go to the daemon */
	__u8 pad;
};

/* jp_jpy_stats (PERCPU_ARRAY, one entry): what the JPY programs did. Mirror of
 * kernel/bpf_jpy.py JpyCount, in the same order. */
enum jp_jpy_count {
	JP_JPY_UP = 0,		/* pledge datagrams relayed to the registrar */
	JP_JPY_DOWN = 1,	/* replies relayed to pledges */
	JP_JPY_FORGED = 2,	/* header did not authenticate */
	JP_JPY_STALE = 3,	/* header's key id is not live */
	JP_JPY_TOO_BIG = 4,	/* pledge datagram too big to wrap */
	JP_JPY_MALFORMED = 5,	/* lengths lie, message truncated */
	JP_JPY_UNSOLICITED = 6,	/* reply for a join link not served */
	JP_JPY_SEND_ERROR = 7,	/* the kernel refused to resize or rewrite the packet */
	JP_JPY_REPLAYED = 8,	/* this reply was relayed within JP_JPY_REPLAY_NS */
	JP_JPY__COUNT = 9,
};

/* jp_jpy_replays (LRU_HASH): replies relayed lately, as relays/jpy.py's ReplayFilter keeps
 * their digests: state about replies, never about pledges, bounded. The key is what tells two
 * replies of a flow apart without hashing the whole datagram: the header, the first 16
 * content bytes (a DTLS record header: epoch and 48-bit sequence number, unique per record),
 * the content length and the UDP checksum (a sum over every byte). */
#define JP_JPY_REPLAY_ENTRIES 16384
#define JP_JPY_REPLAY_NS 120000000000ULL	/* relays/jpy.py REPLAY_SECONDS */
struct jp_jpy_replay_key {
	__u8 header[32];
	__u8 content[16];
	__u16 len;
	__u16 csum;
};

/* jp_jpy_last (PERCPU_ARRAY, JP_JPY__COUNT entries): who caused the latest count of each
 * kind on this CPU, so the daemon can log a refusal once with who, as it does for its own. */
struct jp_jpy_who {
	__u8 addr[16];		/* the pledge (join side) or the reply's source (backbone) */
	__u32 ifindex;		/* where it arrived */
	__u16 port;		/* its UDP source port, host order */
	__u16 pad;
	__u64 seq;		/* this CPU's count of that kind when it was written */
};

struct jp_jpy_stats {
	__u64 n[JP_JPY__COUNT];
	__u64 bytes_up;		/* pledge datagram bytes relayed up (content) */
	__u64 bytes_down;	/* reply content bytes relayed down */
	__u64 xdp_up;		/* of the n[JP_JPY_UP], those jp_jpy_xdp_join relayed */
};

/* ---- BPF side only: the counters map every object declares the same way, and the one
 * function that counts. With pinning, libbpf reuses one pinned jp_counters for all objects;
 * without it each object has its own. Either way each row is written by one program only. */
#if defined(__bpf__)
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, JP_PROG__COUNT);
	__type(key, __u32);
	__type(value, struct jp_counters);
} jp_counters SEC(".maps");

/* Count one verdict: the action, and for a drop (or a Packet Too Big) its reason. Per-CPU rows, so a plain
 * increment is exact (BPF programs do not migrate while they run). */
static __always_inline void jp_count(__u32 prog, __u32 action, __u32 reason)
{
	struct jp_counters *c = bpf_map_lookup_elem(&jp_counters, &prog);

	if (!c)
		return;
	if (action < JP_ACT__COUNT)
		c->action[action]++;
	if ((action == JP_ACT_DROP || action == JP_ACT_TOO_BIG) && reason < JP_DROP__COUNT)
		c->drop[reason]++;
}
#endif /* __bpf__ */

#endif /* JOINPROXY_H */
