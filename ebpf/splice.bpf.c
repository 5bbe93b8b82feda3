// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * splice.bpf.c: the circuit relay (RFC 8995 §4) spliced in the kernel with a sockhash.
 *
 *   jp_splice_verdict  sk_skb stream verdict of every socket in jp_splice_socks. Whatever
 *                      TCP payload one side of a circuit receives is counted in its row of
 *                      jp_splice_sides and sent out of the other side's socket
 *                      (bpf_sk_redirect_hash, egress), so no byte of a spliced circuit is
 *                      copied into user space.
 *
 * The daemon (relays/circuit_splice.py) is the only writer of both maps: it puts a circuit's
 * two established sockets in jp_splice_socks, keyed by their socket cookies, and each side's
 * row (its peer's cookie) in jp_splice_sides, before either socket is inserted. It reads the
 * byte counters for metrics and the idle timeout, passes half-closes on (a FIN is not
 * payload: the kernel wakes the socket's reader, which sees end of file), and removes the
 * rows when the circuit closes (the kernel removes a closed socket from the sockhash itself).
 *
 * A socket with no row (there is none: the daemon writes rows first) keeps its bytes for
 * user space (SK_PASS). A redirect that fails (the peer's socket already left the map) drops
 * the bytes and counts them in the side's `dropped`: the circuit is closing anyway.
 */
#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>

#define JP_SPLICE_MAX_SOCKS 65536

struct jp_splice_side {
	__u64 peer;     /* socket cookie of the other side of the circuit */
	__u64 bytes;    /* payload bytes received on this side and redirected */
	__u64 segments; /* skbs redirected */
	__u64 dropped;  /* bytes dropped because the redirect failed */
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, JP_SPLICE_MAX_SOCKS);
	__type(key, __u64);
	__type(value, __u64);
} jp_splice_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, JP_SPLICE_MAX_SOCKS);
	__type(key, __u64);
	__type(value, struct jp_splice_side);
} jp_splice_sides SEC(".maps");

SEC("sk_skb/stream_verdict")
int jp_splice_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct jp_splice_side *side = bpf_map_lookup_elem(&jp_splice_sides, &cookie);

	if (!side)
		return SK_PASS;
	/* A bare FIN comes through here too, as an empty skb: sent on, the peer's backlog
	 * would take its zero-byte send for a broken pipe. The FIN itself reaches the daemon
	 * as end of file (RCV_SHUTDOWN), which half-closes the peer after its bytes. */
	if (skb->len == 0)
		return SK_DROP;
	__u64 peer = side->peer;
	long verdict = bpf_sk_redirect_hash(skb, &jp_splice_socks, &peer, 0);

	if (verdict == SK_PASS) {
		__sync_fetch_and_add(&side->bytes, skb->len);
		__sync_fetch_and_add(&side->segments, 1);
	} else {
		__sync_fetch_and_add(&side->dropped, skb->len);
	}
	return verdict;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
