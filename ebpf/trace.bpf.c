// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * trace.bpf.c: why did the kernel drop this pledge's packet? A BTF tracepoint on
 * skb:kfree_skb that reports every drop on the links the daemon lists in jp_trace_ifs (the
 * join links and the backbone, keyed by network namespace and ifindex) to user space
 * through a ring buffer: the kernel's drop reason (enum skb_drop_reason, whose names user
 * space reads from the running kernel's BTF), the device and the first bytes of the network
 * header, which user space parses (addresses, ports, the inner packet of IPv6-in-IPv6).
 *
 * Attached only while someone runs `joinproxyctl trace` (daemon/joinproxyd/drop_trace.py):
 * a tracepoint without a program costs nothing. CO-RE: the few kernel fields read are
 * declared below with preserve_access_index and relocated by libbpf at load time, so the
 * object needs no vmlinux.h and runs on any kernel with BTF and this tracepoint's reason
 * argument (5.17 and later).
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

/* Only what is read; libbpf finds each field by name in the running kernel's BTF. */
struct ns_common {
	unsigned int inum;
} __attribute__((preserve_access_index));

struct net {
	struct ns_common ns;
} __attribute__((preserve_access_index));

typedef struct {
	struct net *net;
} possible_net_t;

struct net_device {
	int ifindex;
	possible_net_t nd_net;
} __attribute__((preserve_access_index));

struct sk_buff {
	struct net_device *dev;
	unsigned char *head;
	unsigned char *data;
	unsigned int len;
	__u16 network_header;
	__u16 protocol;
} __attribute__((preserve_access_index));

#define JP_TRACE_HDR 128	/* network header bytes copied: outer + inner IPv6 + L4 */
#define JP_SKB_CONSUMED 1	/* enum skb_drop_reason: freed after use, not a drop */

/* jp_trace_ifs (HASH): the devices whose drops are reported; written by the daemon. */
struct jp_trace_if {
	__u32 netns;	/* inode number of the network namespace (ns.inum) */
	__u32 ifindex;
};

/* One drop, as the ring buffer carries it (drop_trace.py EventC mirrors it). */
struct jp_trace_event {
	__u64 ts_ns;		/* bpf_ktime_get_ns() */
	__u64 location;		/* kernel address that freed the packet */
	__u32 reason;		/* enum skb_drop_reason */
	__u32 ifindex;
	__u32 len;		/* bytes from the network header to the end of the packet */
	__u16 protocol;		/* skb->protocol, network order */
	__u16 hdr_len;		/* bytes of hdr[] that hold the packet */
	__u8 hdr[JP_TRACE_HDR];	/* from the network header on */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 512);
	__type(key, struct jp_trace_if);
	__type(value, __u8);
} jp_trace_ifs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} jp_trace_events SEC(".maps");

SEC("tp_btf/kfree_skb")
int jp_trace_drop(__u64 *ctx)
{
	struct sk_buff *skb = (struct sk_buff *)ctx[0];
	__u32 reason = (__u32)ctx[2];
	struct jp_trace_if key = {};
	struct jp_trace_event *ev;
	unsigned char *head;
	__u16 nh;

	if (reason == JP_SKB_CONSUMED)
		return 0;
	key.ifindex = BPF_CORE_READ(skb, dev, ifindex);
	if (!key.ifindex)
		return 0;
	key.netns = BPF_CORE_READ(skb, dev, nd_net.net, ns.inum);
	if (!bpf_map_lookup_elem(&jp_trace_ifs, &key))
		return 0;
	ev = bpf_ringbuf_reserve(&jp_trace_events, sizeof(*ev), 0);
	if (!ev)
		return 0;	/* the reader is behind: this drop is not reported */
	ev->ts_ns = bpf_ktime_get_ns();
	ev->location = ctx[1];
	ev->reason = reason;
	ev->ifindex = key.ifindex;
	ev->protocol = BPF_CORE_READ(skb, protocol);
	head = BPF_CORE_READ(skb, head);
	nh = BPF_CORE_READ(skb, network_header);
	/* skb->len counts from skb->data, which a layer above IP has moved past the header */
	ev->len = BPF_CORE_READ(skb, len) + (BPF_CORE_READ(skb, data) - (head + nh));
	ev->hdr_len = 0;
	if (head && nh != (__u16)~0U &&
	    bpf_probe_read_kernel(ev->hdr, sizeof(ev->hdr), head + nh) == 0)
		ev->hdr_len = sizeof(ev->hdr);	/* may run past the packet: len says where */
	bpf_ringbuf_submit(ev, 0);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
