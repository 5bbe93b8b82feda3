// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * guard.bpf.c: the XDP join-port guard, attached to every join link whatever the relay mode.
 *
 * What it rations, per (source address, ingress interface), each with a token bucket in an
 * LRU hash (rate tokens a second up to burst; a packet takes one token or is dropped,
 * reason rate-limit):
 *   - UDP datagrams to a join port (IPv6 and IPv4, first fragments included): UDP modes
 *     (CoAPS, JPY, IPIP to a UDP port) have no connection setup to ration instead;
 *     rate_pps/burst.
 *   - TCP SYNs without ACK to a join port, i.e. new connections: syn_rate_pps/syn_burst.
 *     Every other TCP segment to a join port is let through (counted as allow): a
 *     pledge's established connection must never lose a segment to the guard (a lost
 *     segment costs a retransmission timeout, 200 ms to seconds); how many connections a
 *     pledge may hold is the circuit limits' business, and segments of no connection the
 *     stack answers with a reset.
 * The LRU bounds memory under a spoofed flood (old buckets are evicted; a returning source
 * then starts with a full bucket). Everything else passes untouched. After a pass the guard
 * tail-calls jp_guard_next[0] when the control plane put a program there (the XDP IPIP
 * encapsulation), so the guard and a data-plane XDP program share the one XDP hook of the
 * link.
 *
 * Time is the coarse clock (one tick, 1-10 ms, of resolution, and no TSC read per packet):
 * the bucket is refilled in tick-sized steps, which the burst absorbs.
 *
 * Buckets are updated without a lock: two CPUs refilling the same bucket at once can lose
 * one update, i.e. let through at most one extra packet per racing CPU. A flood guard can
 * afford that; a spin lock would cost every packet (and LRU maps cannot hold one).
 *
 * Malformed input: anything that is not a complete IPv6/IPv4 header with a complete port
 * pair passes untouched (the stack drops it; the guard only rations well-formed traffic to
 * the join ports). IPv6 extension headers are walked (hop-by-hop, routing, destination
 * options, fragment; at most 4) so they cannot be used to slip past the guard; a non-first
 * fragment carries no port and passes.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "joinproxy.h"

#define MAX_EXT_HDRS 4
#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_DEST 60
#define TCP_FLAGS_OFF 13	/* the byte with CWR ECE URG ACK PSH RST SYN FIN */
#define TCP_SYN 0x02
#define TCP_ACK 0x10

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Rate, burst and join ports. Written only by bpf.py. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct jp_guard_cfg);
} jp_guard_cfg SEC(".maps");

/* Token buckets. Written by this program only; bpf.py reads them for status. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct jp_guard_key);
	__type(value, struct jp_guard_bucket);
} jp_guard_bkt SEC(".maps");

/* The XDP program that runs after the guard on a pass (slot 0), or none. Written only by
 * bpf.py. */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} jp_guard_next SEC(".maps");

static __always_inline int port_listed(const __u16 *ports, __u16 port)
{
	int i;

#pragma unroll
	for (i = 0; i < JP_GUARD_MAX_PORTS; i++)
		if (ports[i] != 0 && ports[i] == port)
			return 1;
	return 0;
}

/* Finds the L4 protocol and the offset of its header behind an IPv6 header; returns 0 when
 * there is none to look at (not TCP/UDP, cut short, non-first fragment, too many headers). */
static __always_inline int ipv6_l4(void *data, void *data_end, __u32 *off, __u8 *proto)
{
	struct ipv6hdr *ip6 = data + *off;
	__u8 nexthdr;
	__u8 *ext;
	int i;

	if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
		return 0;
	nexthdr = ip6->nexthdr;
	*off += sizeof(*ip6);
#pragma unroll
	for (i = 0; i < MAX_EXT_HDRS; i++) {
		if (nexthdr == IPPROTO_TCP || nexthdr == IPPROTO_UDP)
			break;
		if (nexthdr != NEXTHDR_HOP && nexthdr != NEXTHDR_ROUTING &&
		    nexthdr != NEXTHDR_DEST && nexthdr != NEXTHDR_FRAGMENT)
			return 0;
		*off &= 0x3fff;	/* bound the offset for the verifier; real offsets are far smaller */
		ext = data + *off;
		if ((void *)(ext + 8) > data_end)
			return 0;
		if (nexthdr == NEXTHDR_FRAGMENT) {
			/* fragment offset (13 bits) nonzero: no L4 header in this fragment */
			if ((((__u16)ext[2] << 8 | ext[3]) & 0xfff8) != 0)
				return 0;
			nexthdr = ext[0];
			*off += 8;
		} else {
			nexthdr = ext[0];
			*off += ((__u32)ext[1] + 1) * 8;
		}
	}
	if (nexthdr != IPPROTO_TCP && nexthdr != IPPROTO_UDP)
		return 0;
	*proto = nexthdr;
	return 1;
}

static __always_inline __u32 guard(struct xdp_md *ctx, __u32 *reason)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct jp_guard_key key = {};
	struct jp_guard_bucket *b, fresh;
	struct jp_guard_cfg *cfg;
	__u32 zero = 0, off = sizeof(*eth);
	__u64 now, cap, tokens, elapsed, rate, burst;
	__u16 *ports;
	__u8 proto = 0;

	cfg = bpf_map_lookup_elem(&jp_guard_cfg, &zero);
	if (!cfg || cfg->rate_pps == 0)
		return JP_ACT_PASS;	/* guard off */
	if ((void *)(eth + 1) > data_end)
		return JP_ACT_PASS;

	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + off;

		if (!ipv6_l4(data, data_end, &off, &proto))
			return JP_ACT_PASS;
		/* ipv6_l4 checked the header is complete */
		if ((void *)(ip6 + 1) > data_end)
			return JP_ACT_PASS;
		__builtin_memcpy(key.addr, &ip6->saddr, 16);
	} else if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip4 = data + off;

		if ((void *)(ip4 + 1) > data_end || ip4->version != 4 || ip4->ihl < 5)
			return JP_ACT_PASS;
		if (ip4->protocol != IPPROTO_TCP && ip4->protocol != IPPROTO_UDP)
			return JP_ACT_PASS;
		if ((bpf_ntohs(ip4->frag_off) & 0x1fff) != 0)
			return JP_ACT_PASS;	/* non-first fragment: no ports */
		off += ip4->ihl * 4;
		proto = ip4->protocol;
		key.addr[10] = 0xff;	/* ::ffff:a.b.c.d */
		key.addr[11] = 0xff;
		__builtin_memcpy(&key.addr[12], &ip4->saddr, 4);
	} else {
		return JP_ACT_PASS;
	}

	off &= 0x3fff;
	ports = data + off;
	if ((void *)(ports + 2) > data_end)
		return JP_ACT_PASS;
	if (!port_listed(cfg->ports, bpf_ntohs(ports[1])))
		return JP_ACT_PASS;

	rate = cfg->rate_pps;
	burst = cfg->burst;
	if (proto == IPPROTO_TCP) {
		__u8 *flags = (__u8 *)ports + TCP_FLAGS_OFF;

		if ((void *)(flags + 1) > data_end)
			return JP_ACT_PASS;	/* cut short: the stack drops it */
		if ((*flags & (TCP_SYN | TCP_ACK)) != TCP_SYN)
			return JP_ACT_ALLOW;	/* part of a connection: never rationed */
		rate = cfg->syn_rate_pps;
		burst = cfg->syn_burst;
		if (rate == 0)
			return JP_ACT_ALLOW;	/* SYNs not limited */
	}

	key.ifindex = ctx->ingress_ifindex;
	key.proto = proto;
	now = bpf_ktime_get_coarse_ns();
	cap = burst * JP_TOKEN_ONE;
	b = bpf_map_lookup_elem(&jp_guard_bkt, &key);
	if (!b) {
		/* a new source starts with a full bucket, less this packet */
		fresh.tokens = cap >= JP_TOKEN_ONE ? cap - JP_TOKEN_ONE : 0;
		fresh.last_ns = now;
		fresh.drops = 0;
		if (cap < JP_TOKEN_ONE) {
			*reason = JP_DROP_RATE_LIMIT;	/* burst 0: nothing gets through */
			return JP_ACT_DROP;
		}
		if (bpf_map_update_elem(&jp_guard_bkt, &key, &fresh, BPF_ANY) < 0) {
			*reason = JP_DROP_TABLE_FULL;
			return JP_ACT_DROP;
		}
		return JP_ACT_ALLOW;
	}

	tokens = b->tokens;
	if (tokens > cap)
		tokens = cap;	/* the burst was lowered by a reload */
	elapsed = now > b->last_ns ? now - b->last_ns : 0;
	/* Refill without overflow: when the elapsed time alone fills the bucket, fill it;
	 * otherwise elapsed * rate < cap - tokens, which fits in 64 bits. */
	if (elapsed >= (cap - tokens) / rate)
		tokens = cap;
	else
		tokens += elapsed * rate;
	b->last_ns = now;
	if (tokens < JP_TOKEN_ONE) {
		b->tokens = tokens;
		__sync_fetch_and_add(&b->drops, 1);
		*reason = JP_DROP_RATE_LIMIT;
		return JP_ACT_DROP;
	}
	b->tokens = tokens - JP_TOKEN_ONE;
	return JP_ACT_ALLOW;
}

SEC("xdp")
int jp_guard(struct xdp_md *ctx)
{
	__u32 reason = 0;
	__u32 action = guard(ctx, &reason);

	jp_count(JP_PROG_GUARD, action, reason);
	if (action == JP_ACT_DROP)
		return XDP_DROP;
	/* Hand over to the data-plane XDP program, if any; without one this returns. */
	bpf_tail_call(ctx, &jp_guard_next, 0);
	return XDP_PASS;
}
