// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * bare_redirect.bpf.c: the baselines of bench/ipip_pps.py.
 *
 *   jp_bare_redir  redirects every frame, unmodified, to jp_bare_cfg.ifindex, and counts it
 *                  the way the real programs count, so the benchmark's ratio shows what
 *                  parsing, lookups and encapsulation cost on top of moving the frame. With
 *                  ifindex 0 it is a counting sink (XDP_DROP), used on the receiving end of
 *                  the benchmark's veth pairs (a veth only accepts redirected frames when
 *                  its peer runs XDP).
 *   jp_bare_push   the same, after pushing 40 bytes and moving the Ethernet header in front
 *                  of them: the floor of any IPv6-in-IPv6 encapsulation (the head
 *                  adjustment, and in live-frame test runs the frame rebuilt around it),
 *                  with no parsing, lookup or header of its own.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>

#include "joinproxy.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Where to send frames. Written only by bpf.py. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct jp_bare_cfg);
} jp_bare_cfg SEC(".maps");

SEC("xdp")
int jp_bare_redir(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct jp_bare_cfg *cfg = bpf_map_lookup_elem(&jp_bare_cfg, &zero);

	if (!cfg || cfg->ifindex == 0) {
		jp_count(JP_PROG_BARE_REDIRECT, JP_ACT_DROP, JP_DROP_IRRELEVANT);
		return XDP_DROP;
	}
	jp_count(JP_PROG_BARE_REDIRECT, JP_ACT_REDIRECT, 0);
	return bpf_redirect(cfg->ifindex, 0);
}

SEC("xdp")
int jp_bare_push(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct jp_bare_cfg *cfg = bpf_map_lookup_elem(&jp_bare_cfg, &zero);
	void *data, *data_end;

	if (!cfg || cfg->ifindex == 0) {
		jp_count(JP_PROG_BARE_PUSH, JP_ACT_DROP, JP_DROP_IRRELEVANT);
		return XDP_DROP;
	}
	if (bpf_xdp_adjust_head(ctx, -40) < 0) {
		jp_count(JP_PROG_BARE_PUSH, JP_ACT_DROP, JP_DROP_SEND_ERROR);
		return XDP_DROP;
	}
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + 40 + ETH_HLEN > data_end) {
		jp_count(JP_PROG_BARE_PUSH, JP_ACT_DROP, JP_DROP_SEND_ERROR);
		return XDP_DROP;
	}
	/* the frame's own Ethernet header, read where it was, written in front */
	*(__u16 *)data = *(__u16 *)(data + 40);
	*(__u32 *)(data + 2) = *(__u32 *)(data + 42);
	*(__u32 *)(data + 6) = *(__u32 *)(data + 46);
	*(__u32 *)(data + 10) = *(__u32 *)(data + 50);
	jp_count(JP_PROG_BARE_PUSH, JP_ACT_REDIRECT, 0);
	return bpf_redirect(cfg->ifindex, 0);
}

/* The tc baseline (bench/jpy_kernel_pps.py): every frame on the hook redirected unmodified
 * to the target's egress, the least a tc program that moves a packet can cost. */
SEC("tc")
int jp_bare_tc(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct jp_bare_cfg *cfg = bpf_map_lookup_elem(&jp_bare_cfg, &zero);

	if (!cfg || cfg->ifindex == 0) {
		jp_count(JP_PROG_BARE_TC, JP_ACT_DROP, JP_DROP_IRRELEVANT);
		return 2;	/* TC_ACT_SHOT */
	}
	jp_count(JP_PROG_BARE_TC, JP_ACT_REDIRECT, 0);
	return bpf_redirect(cfg->ifindex, 0);
}
