// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * ipip.bpf.c: the stateless IPIP join proxy (protocols.md §7, design.md "ipip" mode).
 *
 *   jp_tc_join      tc ingress of a join link. A pledge's TCP/UDP packet to the registrar's
 *                   announced link-local address and a join port is wrapped in an outer IPv6
 *                   header (proxy backbone address for this join link -> registrar) and sent
 *                   out of the backbone: with the next hop's MACs from jp_encap_cache and a
 *                   plain bpf_redirect when they are known, else with bpf_redirect_neigh,
 *                   which routes and resolves in the kernel. This is the working path.
 *   jp_tc_backbone  tc ingress of the backbone. IPIP (next header 41 or 98) from an allowed
 *                   registrar to one of the per-join-link backbone addresses is unwrapped and
 *                   sent out of that join link, again with bpf_redirect_neigh.
 *   jp_xdp_join     XDP variant of jp_tc_join: the header, MACs and route MTU come ready
 *                   from jp_encap_cache (bpf_fib_lookup answers, kept per CPU for 100 ms);
 *                   without a known next hop it passes the packet on to jp_tc_join (counted
 *                   as "fallback"), whose redirect resolves it. Runs tail-called from
 *                   jp_guard.
 *
 * No per-pledge state: the pledge's address travels in the inner header (habit 14).
 * Everything not addressed to us passes untouched; every drop is counted by reason.
 *
 * Malformed input, decided per case (the tests pin each one down):
 *   join side, not to the registrar's link-local address/port, or cut before the IPv6
 *     header ends (short Ethernet, short IPv6, version != 6) -> PASS: not ours, the stack
 *     judges it;
 *   join side, to the registrar but not TCP/UDP directly after the IPv6 header (ICMPv6 and
 *     neighbour discovery, extension headers) -> PASS: ND must reach the stack (proxy ND),
 *     and a stateless relay cannot follow fragments by port;
 *   join side, to the registrar, TCP/UDP, but the L4 header is cut short or the payload
 *     length disagrees with the frame (also jumbograms) -> DROP malformed: relaying it would
 *     put a lying length on the backbone;
 *   join side, too big for the backbone (device or route MTU) once 40 bytes are added ->
 *     TOO_BIG: dropped (counted as oversized) and answered with an ICMPv6 Packet Too Big
 *     from the registrar's link-local address, so the pledge's stack lowers its path MTU
 *     (a silent drop would black-hole every full-sized packet); the XDP program hands such
 *     packets to the tc program (fallback), which builds the answer;
 *   backbone side, not IPIP to one of our per-join-link addresses -> PASS;
 *   backbone side, IPIP to us from a source not in jp_registrars -> DROP no-registrar
 *     (nothing else on this host consumes protocol 41/98 sent to these addresses);
 *   backbone side, outer length lies -> DROP malformed; inner not IPv6, inner destination
 *     not link-local, inner length disagrees -> DROP bad-header.
 * A packet is never modified and then passed: once bpf_skb_adjust_room has run, a later
 * failure drops it (send-error).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/icmpv6.h>
#include <linux/in.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "joinproxy.h"

/* Not in Debian 12's UAPI headers (added in Linux 6.3); platform.md. */
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV6
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)
#endif

#define AF_INET6 10
#define IP6_HLEN 40
#define OUTER_HOP_LIMIT 64
/* One destination-options header is accepted before the inner packet: Linux ip6tnl peers
 * insert an RFC 2473 tunnel encapsulation limit option unless told "encaplimit none". */
#define NEXTHDR_DEST 60

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Join link -> what to encapsulate and where to. Written only by bpf.py. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, JP_MAX_JOIN_LINKS);
	__type(key, __u32);
	__type(value, struct jp_join_cfg);
} jp_join_cfg SEC(".maps");

/* Outer destination -> join link. "One backbone address per join link" is what keeps the
 * proxy stateless: the registrar's reply carries no other hint of the link the pledge sits
 * on (the pledge's fe80:: address is only unique per link), so the address it is sent to has
 * to say it. Written only by bpf.py, derived from jp_join_cfg. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, JP_MAX_JOIN_LINKS);
	__type(key, struct jp_addr);
	__type(value, struct jp_bb_addr);
} jp_bb_addrs SEC(".maps");

/* Registrars allowed to send IPIP to us. Written only by bpf.py. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct jp_addr);
	__type(value, struct jp_registrar);
} jp_registrars SEC(".maps");

/* Bumped after every change of jp_join_cfg (joinproxy.h). Written only by bpf.py. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct jp_ipip_gen);
} jp_ipip_gen SEC(".maps");

/* Per CPU and join link: match, finished headers, next hop (joinproxy.h). Kernel-written. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, JP_ENCAP_SLOTS);
	__type(key, __u32);
	__type(value, struct jp_encap);
} jp_encap_cache SEC(".maps");

/* The quoted packet of a Packet Too Big, for its checksum: 1,232 bytes do not fit the
 * 512-byte stack. Per CPU, used within one program run. */
#define PTB_QUOTE 1232	/* IPv6 minimum MTU 1280 - 40 - 8: "as much as fits" (RFC 4443) */
struct jp_quote {
	__u8 bytes[PTB_QUOTE];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct jp_quote);
} jp_ptb_scratch SEC(".maps");

static __always_inline int addr_eq(const void *a, const void *b)
{
	const __u32 *x = a, *y = b;

	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3])) == 0;
}

/* ports[] repeats ports[0] in unused slots (encap_fill), so no zero test is needed. */
static __always_inline int port_listed(const struct jp_encap *e, __u16 port_be)
{
	return port_be == e->ports[0] || port_be == e->ports[1] || port_be == e->ports[2] ||
	       port_be == e->ports[3];
}

/* ------------------------------------------------------------------ next hop -- */

/* Route the outer packet as the host would send it, out of the backbone: MACs from the
 * first lookup, the route MTU from a second one that asks for an impossible length (the
 * helper reports the MTU only when a length exceeds it). bpf_fib_lookup needs IPv6
 * forwarding on the backbone device; without it there is no cached next hop, and the tc
 * program lets bpf_redirect_neigh route each packet instead. */
static __noinline void encap_resolve(void *ctx, struct jp_encap *e, __u64 now)
{
	struct ipv6hdr *o = (void *)(e->hdr + JP_ENCAP_IP6);
	struct bpf_fib_lookup fib = {};
	long rc;

	/* An answer, good or bad, is kept for JP_NH_TTL_NS; egress 0 means "none". */
	e->expires = now + JP_NH_TTL_NS;
	e->egress = 0;

	fib.family = AF_INET6;
	fib.l4_protocol = o->nexthdr;
	fib.ifindex = e->backbone;
	__builtin_memcpy(fib.ipv6_src, &o->saddr, 16);
	__builtin_memcpy(fib.ipv6_dst, &o->daddr, 16);
	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS || fib.ifindex != e->backbone)
		return;
	__builtin_memcpy(e->hdr + JP_ENCAP_ETH, fib.dmac, ETH_ALEN);
	__builtin_memcpy(e->hdr + JP_ENCAP_ETH + ETH_ALEN, fib.smac, ETH_ALEN);

	__builtin_memset(&fib, 0, sizeof(fib));
	fib.family = AF_INET6;
	fib.l4_protocol = o->nexthdr;
	fib.ifindex = e->backbone;
	fib.tot_len = 0xffff;
	__builtin_memcpy(fib.ipv6_src, &o->saddr, 16);
	__builtin_memcpy(fib.ipv6_dst, &o->daddr, 16);
	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT);
	e->mtu = rc == BPF_FIB_LKUP_RET_FRAG_NEEDED ? fib.mtu_result : 0xffff;
	e->egress = e->backbone;
}

/* Build a link's entry from jp_join_cfg: match, outer header, next hop. */
static __noinline void encap_fill(void *ctx, struct jp_encap *e, __u32 ifindex,
				       __u32 generation)
{
	struct jp_join_cfg *cfg = bpf_map_lookup_elem(&jp_join_cfg, &ifindex);
	struct ipv6hdr *o = (void *)(e->hdr + JP_ENCAP_IP6);
	int i;

	__builtin_memset(e, 0, sizeof(*e));
	e->ifindex = ifindex;
	e->generation = generation;
	e->expires = JP_NEVER;
	if (!cfg)
		return;		/* not ours: backbone 0, nothing matches */
	__builtin_memcpy(e->registrar_ll, cfg->registrar_ll, 16);
#pragma unroll
	for (i = 0; i < JP_MAX_PORTS; i++)
		e->ports[i] = bpf_htons(cfg->ports[i] ? cfg->ports[i] : cfg->ports[0]);
	e->hdr[JP_ENCAP_ETH + 12] = ETH_P_IPV6 >> 8;
	e->hdr[JP_ENCAP_ETH + 13] = ETH_P_IPV6 & 0xff;
	o->version = 6;
	o->nexthdr = cfg->proto;
	o->hop_limit = OUTER_HOP_LIMIT;
	__builtin_memcpy(&o->saddr, cfg->outer_src, 16);
	__builtin_memcpy(&o->daddr, cfg->outer_dst, 16);
	e->backbone = cfg->backbone_ifindex;
	encap_resolve(ctx, e, bpf_ktime_get_coarse_ns());
}

/* This CPU's entry for a join link, rebuilt when it belongs to another link or an older
 * configuration; NULL only if the maps cannot be read. */
static __always_inline struct jp_encap *encap_entry(void *ctx, __u32 ifindex)
{
	__u32 zero = 0, slot = ifindex & (JP_ENCAP_SLOTS - 1);
	struct jp_ipip_gen *gen = bpf_map_lookup_elem(&jp_ipip_gen, &zero);
	struct jp_encap *e = bpf_map_lookup_elem(&jp_encap_cache, &slot);

	if (!gen || !e)
		return NULL;
	if (e->ifindex != ifindex || e->generation != gen->generation)
		encap_fill(ctx, e, ifindex, gen->generation);
	return e;
}

/* The next hop of a matched packet, looked up again when older than JP_NH_TTL_NS. The
 * clock is read once per tick at most: jiffies is a plain load (the verifier inlines
 * bpf_jiffies64), where even the coarse clock is a helper call that cost about a tenth of
 * the XDP program; the coarse clock only moves on a tick anyway, so reading it more often
 * would see nothing new. */
static __always_inline __u32 encap_egress(void *ctx, struct jp_encap *e)
{
	__u32 tick = (__u32)bpf_jiffies64();
	__u64 now;

	if (tick != e->tick) {
		e->tick = tick;		/* per CPU: nobody else writes it */
		now = bpf_ktime_get_coarse_ns();
		if (now > e->expires)
			encap_resolve(ctx, e, now);
	}
	return e->egress;
}

/* ---------------------------------------------------------------- join side, tc -- */

/* Turn a pledge's packet that is too big for the backbone into an ICMPv6 Packet Too Big
 * (RFC 4443 3.2) back to it: from the registrar's link-local address (the one the pledge
 * sent to, which this link answers ND for), reporting the MTU left inside the tunnel and
 * quoting the first 1,232 bytes of the packet, so the answer is exactly 1,280 bytes.
 * Oversized means more than backbone MTU - 40 >= 1,240 bytes, so there is always that much
 * to quote. Sent straight back out of the join link to the frame's source MAC; no state.
 * Rate: one answer per oversized packet, which the guard already limits per source, and
 * never larger than the packet that caused it. */
static __always_inline __u32 too_big(struct __sk_buff *skb, const struct jp_encap *e,
				     const struct ipv6hdr *ip6, __u32 mtu, __u32 *reason)
{
	__u32 zero = 0, s;
	struct jp_quote *q = bpf_map_lookup_elem(&jp_ptb_scratch, &zero);
	struct {
		struct ipv6hdr ip6;
		struct icmp6hdr icmp;
	} hdr = {};
	struct {
		__u8 src[16];
		__u8 dst[16];
		__be32 len;
		__u8 zero[3];
		__u8 nexthdr;
	} pseudo = {};
	__u8 macs[2 * ETH_ALEN], swapped[2 * ETH_ALEN];
	__s64 sum;

	*reason = JP_DROP_OVERSIZED;
	if (!q || mtu <= IP6_HLEN)
		return JP_ACT_DROP;
	if (bpf_skb_load_bytes(skb, 0, macs, sizeof(macs)) < 0 ||
	    bpf_skb_load_bytes(skb, ETH_HLEN, q->bytes, PTB_QUOTE) < 0)
		return JP_ACT_DROP;
	__builtin_memcpy(swapped, macs + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(swapped + ETH_ALEN, macs, ETH_ALEN);

	hdr.ip6.version = 6;
	hdr.ip6.payload_len = bpf_htons(sizeof(hdr.icmp) + PTB_QUOTE);
	hdr.ip6.nexthdr = IPPROTO_ICMPV6;
	hdr.ip6.hop_limit = OUTER_HOP_LIMIT;
	__builtin_memcpy(&hdr.ip6.saddr, e->registrar_ll, 16);
	__builtin_memcpy(&hdr.ip6.daddr, &ip6->saddr, 16);
	hdr.icmp.icmp6_type = ICMPV6_PKT_TOOBIG;
	hdr.icmp.icmp6_mtu = bpf_htonl(mtu - IP6_HLEN);

	/* checksum: pseudo-header, ICMPv6 header, quote (bpf_csum_diff takes <= 512 bytes) */
	__builtin_memcpy(pseudo.src, e->registrar_ll, 16);
	__builtin_memcpy(pseudo.dst, &ip6->saddr, 16);
	pseudo.len = bpf_htonl(sizeof(hdr.icmp) + PTB_QUOTE);
	pseudo.nexthdr = IPPROTO_ICMPV6;
	sum = bpf_csum_diff(NULL, 0, (void *)&pseudo, sizeof(pseudo), 0);
	sum = bpf_csum_diff(NULL, 0, (void *)&hdr.icmp, sizeof(hdr.icmp), (__u32)sum);
	sum = bpf_csum_diff(NULL, 0, (void *)q->bytes, 512, (__u32)sum);
	sum = bpf_csum_diff(NULL, 0, (void *)(q->bytes + 512), 512, (__u32)sum);
	sum = bpf_csum_diff(NULL, 0, (void *)(q->bytes + 1024), PTB_QUOTE - 1024, (__u32)sum);
	if (sum < 0)
		return JP_ACT_DROP;
	s = (__u32)sum;
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	hdr.icmp.icmp6_cksum = ~s & 0xffff;

	/* from here on the packet is being rebuilt: a failure drops it */
	if (bpf_skb_change_tail(skb, ETH_HLEN + PTB_QUOTE, 0) < 0 ||
	    bpf_skb_adjust_room(skb, sizeof(hdr), BPF_ADJ_ROOM_MAC, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &hdr, sizeof(hdr), 0) < 0 ||
	    bpf_skb_store_bytes(skb, 0, swapped, sizeof(swapped), 0) < 0)
		return JP_ACT_DROP;
	if (bpf_redirect(skb->ifindex, 0) != TC_ACT_REDIRECT)
		return JP_ACT_DROP;
	return JP_ACT_TOO_BIG;
}

static __always_inline __u32 tc_join(struct __sk_buff *skb, __u32 *reason)
{
	struct jp_encap *e;
	struct ipv6hdr ip6, outer;
	__u16 ports[2];
	__u32 l3_len, egress, mtu_len = 0;
	long rc;

	e = encap_entry(skb, skb->ifindex);
	if (!e)
		return JP_ACT_PASS;
	/* skb->protocol is the Ethernet type the driver saw; VLAN-tagged frames are not ours */
	if (skb->protocol != bpf_htons(ETH_P_IPV6) || skb->len < ETH_HLEN + IP6_HLEN)
		return JP_ACT_PASS;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
		return JP_ACT_PASS;
	if (ip6.version != 6 || !addr_eq(&ip6.daddr, e->registrar_ll) || !e->backbone)
		return JP_ACT_PASS;
	if (ip6.nexthdr != IPPROTO_TCP && ip6.nexthdr != IPPROTO_UDP)
		return JP_ACT_PASS;
	/* Both TCP and UDP start with source and destination port. */
	if (bpf_skb_load_bytes(skb, ETH_HLEN + IP6_HLEN, ports, sizeof(ports)) < 0) {
		*reason = JP_DROP_MALFORMED;
		return JP_ACT_DROP;
	}
	if (!port_listed(e, ports[1]))
		return JP_ACT_PASS;
	l3_len = skb->len - ETH_HLEN;
	if ((__u32)bpf_ntohs(ip6.payload_len) + IP6_HLEN != l3_len) {
		*reason = JP_DROP_MALFORMED;
		return JP_ACT_DROP;
	}
	/* bpf_check_mtu also handles GRO packets (it checks their segments); the route MTU is
	 * compared for single packets only. */
	if (bpf_check_mtu(skb, e->backbone, &mtu_len, IP6_HLEN, 0) != 0)
		return too_big(skb, e, &ip6, mtu_len, reason);
	egress = encap_egress(skb, e);
	if (egress && !skb->gso_size && l3_len + IP6_HLEN > e->mtu)
		return too_big(skb, e, &ip6, e->mtu, reason);
	__builtin_memcpy(&outer, e->hdr + JP_ENCAP_IP6, sizeof(outer));
	outer.payload_len = bpf_htons(l3_len);
	if (bpf_skb_adjust_room(skb, IP6_HLEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV6) < 0) {
		*reason = JP_DROP_SEND_ERROR;	/* unchanged, but it cannot be relayed */
		return JP_ACT_DROP;
	}
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &outer, sizeof(outer), 0) < 0) {
		*reason = JP_DROP_SEND_ERROR;	/* grown: never pass it on */
		return JP_ACT_DROP;
	}
	if (egress) {
		/* the cached next hop: write the MACs, a plain redirect, no route lookup */
		if (bpf_skb_store_bytes(skb, 0, e->hdr + JP_ENCAP_ETH, 2 * ETH_ALEN, 0) < 0) {
			*reason = JP_DROP_SEND_ERROR;
			return JP_ACT_DROP;
		}
		rc = bpf_redirect(egress, 0);
	} else {
		/* The kernel routes the outer destination out of the backbone (an on-link
		 * registrar or a router) and resolves the MAC, queueing behind ND if needed. */
		rc = bpf_redirect_neigh(e->backbone, NULL, 0, 0);
	}
	if (rc != TC_ACT_REDIRECT) {
		*reason = JP_DROP_SEND_ERROR;
		return JP_ACT_DROP;
	}
	return JP_ACT_ENCAP;
}

static __always_inline int tc_code(__u32 action)
{
	switch (action) {
	case JP_ACT_ENCAP:
	case JP_ACT_DECAP:
	case JP_ACT_TOO_BIG:
		return TC_ACT_REDIRECT;
	case JP_ACT_DROP:
		return TC_ACT_SHOT;
	default:
		return TC_ACT_OK;
	}
}

SEC("tc")
int jp_tc_join(struct __sk_buff *skb)
{
	__u32 reason = 0;
	__u32 action = tc_join(skb, &reason);

	jp_count(JP_PROG_TC_JOIN, action, reason);
	return tc_code(action);
}

/* ------------------------------------------------------------ backbone side, tc -- */

static __always_inline __u32 tc_backbone(struct __sk_buff *skb, __u32 *reason)
{
	struct ipv6hdr outer, inner;
	struct jp_bb_addr *bb;
	__u32 l3_len, hdr_len = IP6_HLEN, mtu_len = 0;
	__u8 nexthdr, opt[2];
	long rc;

	if (skb->protocol != bpf_htons(ETH_P_IPV6) || skb->len < ETH_HLEN + IP6_HLEN)
		return JP_ACT_PASS;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &outer, sizeof(outer)) < 0)
		return JP_ACT_PASS;
	if (outer.version != 6)
		return JP_ACT_PASS;
	nexthdr = outer.nexthdr;
	if (nexthdr == NEXTHDR_DEST) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN + IP6_HLEN, opt, sizeof(opt)) < 0)
			return JP_ACT_PASS;
		nexthdr = opt[0];
		hdr_len += ((__u32)opt[1] + 1) * 8;
	}
	if (nexthdr != JP_IPPROTO_IPV6 && nexthdr != JP_IPPROTO_ENCAP)
		return JP_ACT_PASS;
	bb = bpf_map_lookup_elem(&jp_bb_addrs, &outer.daddr);
	if (!bb)
		return JP_ACT_PASS;
	if (!bpf_map_lookup_elem(&jp_registrars, &outer.saddr)) {
		*reason = JP_DROP_NO_REGISTRAR;
		return JP_ACT_DROP;
	}
	l3_len = skb->len - ETH_HLEN;
	if ((__u32)bpf_ntohs(outer.payload_len) + IP6_HLEN != l3_len ||
	    l3_len < hdr_len + IP6_HLEN) {
		*reason = JP_DROP_MALFORMED;
		return JP_ACT_DROP;
	}
	if (bpf_skb_load_bytes(skb, ETH_HLEN + hdr_len, &inner, sizeof(inner)) < 0) {
		*reason = JP_DROP_MALFORMED;
		return JP_ACT_DROP;
	}
	/* The inner packet goes onto a join link as it is: it must be IPv6, to a link-local
	 * address (fe80::/10), and exactly as long as what the outer header carries. */
	if (inner.version != 6 || inner.daddr.in6_u.u6_addr8[0] != 0xfe ||
	    (inner.daddr.in6_u.u6_addr8[1] & 0xc0) != 0x80 ||
	    (__u32)bpf_ntohs(inner.payload_len) + IP6_HLEN + hdr_len != l3_len) {
		*reason = JP_DROP_BAD_HEADER;
		return JP_ACT_DROP;
	}
	if (bpf_check_mtu(skb, bb->join_ifindex, &mtu_len, -(__s32)hdr_len, 0) != 0) {
		*reason = JP_DROP_OVERSIZED;
		return JP_ACT_DROP;
	}
	if (bpf_skb_adjust_room(skb, -(__s32)hdr_len, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_DECAP_L3_IPV6) < 0) {
		*reason = JP_DROP_SEND_ERROR;
		return JP_ACT_DROP;
	}
	/* The kernel looks up the pledge's fe80:: on the join link and resolves its MAC. */
	rc = bpf_redirect_neigh(bb->join_ifindex, NULL, 0, 0);
	if (rc != TC_ACT_REDIRECT) {
		*reason = JP_DROP_SEND_ERROR;
		return JP_ACT_DROP;
	}
	return JP_ACT_DECAP;
}

SEC("tc")
int jp_tc_backbone(struct __sk_buff *skb)
{
	__u32 reason = 0;
	__u32 action = tc_backbone(skb, &reason);

	jp_count(JP_PROG_TC_BACKBONE, action, reason);
	return tc_code(action);
}

/* --------------------------------------------------------------- join side, XDP -- */

/* Count a verdict and turn it into the XDP code. Every exit of jp_xdp_join calls it with
 * constants, so each is compiled on its own: one shared exit would carry the action and
 * reason in registers through every check, which showed as spills and moves on the
 * encapsulation path. */
static __always_inline int xdp_verdict(__u32 action, __u32 reason)
{
	jp_count(JP_PROG_XDP_JOIN, action, reason);
	return action == JP_ACT_DROP ? XDP_DROP : XDP_PASS;
}

SEC("xdp")
int jp_xdp_join(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct jp_encap *e;
	struct ipv6hdr *ip6;
	__u64 *dst, *src;
	__u16 *ports;
	__u32 l3_len, egress;

	e = encap_entry(ctx, ctx->ingress_ifindex);
	if (!e)
		return xdp_verdict(JP_ACT_PASS, 0);
	ip6 = data + ETH_HLEN;
	if ((void *)(ip6 + 1) > data_end)
		return xdp_verdict(JP_ACT_PASS, 0);
	/* the destination as two 64-bit words: the IPv6 header is aligned (NET_IP_ALIGN) */
	dst = (void *)&ip6->daddr;
	src = (void *)e->registrar_ll;
	if (*(__u16 *)(data + 12) != bpf_htons(ETH_P_IPV6) || ip6->version != 6 ||
	    ((dst[0] ^ src[0]) | (dst[1] ^ src[1])) != 0 || !e->backbone)
		return xdp_verdict(JP_ACT_PASS, 0);
	if (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP)
		return xdp_verdict(JP_ACT_PASS, 0);
	ports = (void *)(ip6 + 1);
	if ((void *)(ports + 2) > data_end)
		return xdp_verdict(JP_ACT_DROP, JP_DROP_MALFORMED);
	if (!port_listed(e, ports[1]))
		return xdp_verdict(JP_ACT_PASS, 0);
	l3_len = data_end - (void *)ip6;
	if ((__u32)bpf_ntohs(ip6->payload_len) + IP6_HLEN != l3_len)
		return xdp_verdict(JP_ACT_DROP, JP_DROP_MALFORMED);
	egress = encap_egress(ctx, e);
	/* no next hop yet: jp_tc_join's redirect_neigh resolves it; too big: jp_tc_join
	 * answers with a Packet Too Big */
	if (!egress || l3_len + IP6_HLEN > e->mtu)
		return xdp_verdict(JP_ACT_FALLBACK, 0);

	/* unchanged if it fails, but it cannot be relayed */
	if (bpf_xdp_adjust_head(ctx, -IP6_HLEN) < 0)
		return xdp_verdict(JP_ACT_DROP, JP_DROP_SEND_ERROR);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + ETH_HLEN + IP6_HLEN > data_end)	/* cannot happen after the adjust */
		return xdp_verdict(JP_ACT_DROP, JP_DROP_SEND_ERROR);
	/* The finished headers in word-sized copies, aligned as the stack aligns them:
	 * Ethernet at 2 mod 4, IPv6 at 0 mod 8. */
	*(__u16 *)data = *(__u16 *)(e->hdr + JP_ENCAP_ETH);
	*(__u32 *)(data + 2) = *(__u32 *)(e->hdr + JP_ENCAP_ETH + 2);
	*(__u32 *)(data + 6) = *(__u32 *)(e->hdr + JP_ENCAP_ETH + 6);
	*(__u32 *)(data + 10) = *(__u32 *)(e->hdr + JP_ENCAP_ETH + 10);
	dst = data + ETH_HLEN;
	src = (void *)(e->hdr + JP_ENCAP_IP6);
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
	dst[4] = src[4];
	((struct ipv6hdr *)dst)->payload_len = bpf_htons(l3_len);
	jp_count(JP_PROG_XDP_JOIN, JP_ACT_ENCAP, 0);
	return bpf_redirect(egress, 0);
}
