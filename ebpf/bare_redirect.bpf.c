// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * bare_redirect.bpf.c: the baseline of bench/ipip_pps.py. It redirects every frame,
 * unmodified, to jp_bare_cfg.ifindex, and counts it the way the real programs count, so the
 * benchmark's ratio shows what parsing, lookups and encapsulation cost on top of moving the
 * frame. With ifindex 0 it is a counting sink (XDP_DROP), used on the receiving end of the
 * benchmark's veth pairs (a veth only accepts redirected frames when its peer runs XDP).
 */
#include <linux/bpf.h>
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
