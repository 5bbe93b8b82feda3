// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * jpy.bpf.c: the stateless JPY relay (constrained join proxy draft §4.4-4.5) in tc, and
 * its pledge side also in XDP.
 *
 *   jp_jpy_join      tc ingress of a join link. A pledge's UDP datagram to the link's
 *                    link-local address and join port becomes the JPY message
 *                    [header, datagram] from the backbone address and JPY source port to the
 *                    registrar's JPY port, and is sent out of the backbone.
 *   jp_jpy_backbone  tc ingress of the backbone. A reply from the registrar's JPY port to our
 *                    source port is unwrapped, its header opened, and its content sent from
 *                    the join link's address and port to the pledge the header names.
 *   jp_jpy_xdp_join  XDP twin of jp_jpy_join, tail-called from jp_guard where the backbone
 *                    takes XDP-redirected frames: the common case only, everything else
 *                    passes on to jp_jpy_join unchanged (see its section below).
 *   jp_jpy_setkey    syscall program, run by the daemon (BPF_PROG_TEST_RUN) to create the
 *                    AES contexts of a key slot: bpf_crypto_ctx_create is only callable from
 *                    sleepable programs, encrypt/decrypt from tc and XDP.
 *
 * The header (brski/jpy.py BlockHeaderSealer is the same format in Python, and its test
 * vectors pin this program down): 32 bytes,
 *     key id (1) | C = AES-256(k, P) (16) | T = AES-256(k, P')[0:15] (15)
 * where P = family 0 (1) | ifindex (4, BE) | pledge UDP port (2, BE) | IID (8) | key id (1)
 * and P' is P with the family byte 0x80 (domain separation: T is a PRF tag over P, which no
 * header's C block can ever give away). The draft's §4.5.6 single block with a zero word is
 * forged with odds 2^-32 per try; this one 2^-120. One ECB call over P||P' seals; opening
 * decrypts C and encrypts P' again.
 *
 * What the programs do not understand goes up to the daemon's socket unchanged (PASS): any
 * datagram not exactly for us, a reply whose CBOR is not the canonical two-element array, a
 * link or registrar the daemon has not configured. What they refuse is dropped and counted
 * in jp_jpy_stats: forged or stale headers, truncated messages, too-big datagrams, replies
 * for links not served.
 *
 * Checksums: the UDP header stays where it was and the payload moves behind it, so a
 * CHECKSUM_PARTIAL packet (sent by a local process) keeps a valid csum_start; the checksum is
 * updated incrementally (pseudo-header changes with BPF_F_PSEUDO_HDR, data changes without),
 * the payload's own sum derived from the old checksum. A datagram that arrived with a wrong
 * checksum leaves with a wrong one: the receiver's stack drops it as it would have.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "joinproxy.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* ---- the BPF crypto kfuncs (Linux 6.10+); their types, as vmlinux names them ---- */
struct bpf_crypto_ctx {
	int opaque;	/* only ever pointed to; the kernel matches kptrs by name */
};

struct bpf_crypto_params {
	char type[14];
	__u8 reserved[2];
	char algo[128];
	__u8 key[256];
	__u32 key_len;
	__u32 authsize;
};

extern struct bpf_crypto_ctx *bpf_crypto_ctx_create(const struct bpf_crypto_params *params,
						    __u32 params__sz, int *err) __ksym;
extern void bpf_crypto_ctx_release(struct bpf_crypto_ctx *ctx) __ksym;
extern int bpf_crypto_encrypt(struct bpf_crypto_ctx *ctx, const struct bpf_dynptr *src,
			      const struct bpf_dynptr *dst,
			      const struct bpf_dynptr *siv__nullable) __ksym;
extern int bpf_crypto_decrypt(struct bpf_crypto_ctx *ctx, const struct bpf_dynptr *src,
			      const struct bpf_dynptr *dst,
			      const struct bpf_dynptr *siv__nullable) __ksym;

#define __kptr __attribute__((btf_type_tag("kptr")))

#define ETH_HLEN_ 14
#define IP6_OFF ETH_HLEN_
#define UDP_OFF (ETH_HLEN_ + 40)
#define PAYLOAD_OFF (UDP_OFF + 8)
#define CSUM_OFF (UDP_OFF + 6)
#define HOP_LIMIT 64
#define SCRATCH 2048		/* a power of two above JP_JPY_MAX_CONTENT */

/* One key slot: the AES context and the id it seals under. Written by jp_jpy_setkey. */
struct jp_jpy_slot {
	struct bpf_crypto_ctx __kptr *ctx;
	__u32 key_id;
	__u32 live;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct jp_jpy_slot);
} jp_jpy_keys SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct jp_jpy_cfg);
} jp_jpy_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, JP_MAX_JOIN_LINKS);
	__type(key, __u32);
	__type(value, struct jp_jpy_link);
} jp_jpy_links SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct jp_jpy_stats);
} jp_jpy_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, JP_JPY_REPLAY_ENTRIES);
	__type(key, struct jp_jpy_replay_key);
	__type(value, __u64);
} jp_jpy_replays SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, JP_JPY__COUNT);
	__type(key, __u32);
	__type(value, struct jp_jpy_who);
} jp_jpy_last SEC(".maps");

/* Per CPU, used within one run: the moved payload and the cipher blocks. */
struct jp_jpy_scratch {
	__u8 blocks[32];	/* P || P' in, cipher out */
	__u8 out[32];
	__u8 prefix[40];	/* CBOR framing before the content, zero padded */
	struct jp_jpy_replay_key replay;
	struct jp_jpy_who from;	/* the packet's source, for jp_jpy_last */
	__u8 payload[SCRATCH];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct jp_jpy_scratch);
} jp_jpy_scratch SEC(".maps");

/* ------------------------------------------------------------------ key setup -- */

/* The context a syscall run receives (BPF_PROG_TEST_RUN ctx_in). */
struct jp_jpy_key_args {
	__u32 slot;
	__u32 key_id;
	__u8 key[32];
	__s32 result;	/* out: 0 or -errno */
};

SEC("syscall")
int jp_jpy_setkey(struct jp_jpy_key_args *args)
{
	struct bpf_crypto_params params = {
		.type = "skcipher",
		.algo = "ecb(aes)",
		.key_len = 32,
	};
	struct bpf_crypto_ctx *cctx, *old;
	struct jp_jpy_slot *slot;
	__u32 index = args->slot;
	int err = 0;

	slot = bpf_map_lookup_elem(&jp_jpy_keys, &index);
	if (!slot) {
		args->result = -22;
		return 0;
	}
	__builtin_memcpy(params.key, args->key, 32);
	cctx = bpf_crypto_ctx_create(&params, sizeof(params), &err);
	if (!cctx) {
		args->result = err ? err : -22;
		return 0;
	}
	slot->live = 0;
	old = bpf_kptr_xchg(&slot->ctx, cctx);
	if (old)
		bpf_crypto_ctx_release(old);
	slot->key_id = args->key_id;
	slot->live = 1;
	args->result = 0;
	return 0;
}

/* ------------------------------------------------------------------ helpers -- */

static __always_inline void count(__u32 what, __u64 bytes)
{
	__u32 zero = 0;
	struct jp_jpy_stats *s = bpf_map_lookup_elem(&jp_jpy_stats, &zero);
	struct jp_jpy_scratch *sc;
	struct jp_jpy_who *who;

	if (!s || what >= JP_JPY__COUNT)
		return;
	s->n[what]++;
	if (what == JP_JPY_UP) {
		s->bytes_up += bytes;
		return;
	}
	if (what == JP_JPY_DOWN) {
		s->bytes_down += bytes;
		return;
	}
	/* a drop: remember who, for the daemon's one log line per sender and reason */
	sc = bpf_map_lookup_elem(&jp_jpy_scratch, &zero);
	who = bpf_map_lookup_elem(&jp_jpy_last, &what);
	if (!sc || !who)
		return;
	__builtin_memcpy(who, &sc->from, sizeof(*who));
	who->seq = s->n[what];
}

/* Note the packet's source in scratch, for count(). */
static __always_inline void note_source(struct jp_jpy_scratch *sc, const void *saddr,
					__u16 sport_be, __u32 ifindex)
{
	__builtin_memcpy(sc->from.addr, saddr, 16);
	sc->from.port = bpf_ntohs(sport_be);
	sc->from.ifindex = ifindex;
}

static __always_inline int addr_eq(const void *a, const void *b)
{
	const __u32 *x = a, *y = b;

	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3])) == 0;
}

/* Ones' complement arithmetic on 16-bit sums held as the host loads them from the packet
 * (RFC 1071: the sum is byte-order independent, so no byte swapping is needed). */
static __always_inline __u32 fold(__u64 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (s & 0xffff) + (s >> 16);
}

static __always_inline __u32 sum_words(const void *p, int n)
{
	const __u16 *w = p;
	__u64 s = 0;
	int i;

#pragma unroll
	for (i = 0; i < n / 2; i++)
		s += w[i];
	return fold(s);
}

static __always_inline __u32 csub(__u32 a, __u32 b)
{
	return fold((__u64)a + (~b & 0xffff));
}

static __always_inline __u32 swab16(__u32 v)
{
	return ((v & 0xff) << 8) | ((v >> 8) & 0xff);
}

/* The IPv6 pseudo-header sum for UDP: addresses, upper-layer length, next header. */
static __always_inline __u32 pseudo_sum(const void *saddr, const void *daddr, __u32 len)
{
	__u64 s = sum_words(saddr, 16) + sum_words(daddr, 16);

	s += bpf_htons(len & 0xffff) + bpf_htons(IPPROTO_UDP);
	return fold(s);
}

/* One AES-ECB operation on the scratch blocks (n bytes) with the slot's context. */
static __always_inline int aes(struct jp_jpy_slot *slot, struct jp_jpy_scratch *sc, int n,
			       int decrypt)
{
	struct bpf_crypto_ctx *ctx = slot->ctx;
	struct bpf_dynptr src, dst;

	if (!ctx)
		return -1;
	bpf_dynptr_from_mem(sc->blocks, n, 0, &src);
	bpf_dynptr_from_mem(sc->out, n, 0, &dst);
	if (decrypt)
		return bpf_crypto_decrypt(ctx, &src, &dst, NULL);
	return bpf_crypto_encrypt(ctx, &src, &dst, NULL);
}

/* The live key slot with this id, if any. */
static __always_inline struct jp_jpy_slot *find_slot(__u8 kid)
{
	__u32 zero = 0, one = 1;
	struct jp_jpy_slot *s = bpf_map_lookup_elem(&jp_jpy_keys, &zero);

	if (s && s->live && s->key_id == kid)
		return s;
	s = bpf_map_lookup_elem(&jp_jpy_keys, &one);
	if (s && s->live && s->key_id == kid)
		return s;
	return NULL;
}

struct pkt {
	struct ethhdr *eth;
	struct ipv6hdr *ip6;
	struct udphdr *udp;
};

/* The Ethernet, IPv6 and UDP headers, back to back; 0 if the packet is not that. */
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	void *data, *end;

	if (skb->len < PAYLOAD_OFF || skb->gso_size)
		return 0;
	if ((long)skb->data_end - (long)skb->data < PAYLOAD_OFF)
		bpf_skb_pull_data(skb, PAYLOAD_OFF);
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	p->eth = data;
	p->ip6 = data + IP6_OFF;
	p->udp = data + UDP_OFF;
	if ((void *)(p->udp + 1) > end)
		return 0;
	if (p->eth->h_proto != bpf_htons(ETH_P_IPV6) || p->ip6->version != 6 ||
	    p->ip6->nexthdr != IPPROTO_UDP)
		return 0;
	return 1;
}

/* Move the len bytes at from to to (both offsets into the packet) through scratch. */
static __always_inline int move(struct __sk_buff *skb, struct jp_jpy_scratch *sc, __u32 from,
				__u32 to, __u32 len)
{
	if (len == 0)
		return 0;
	if (len > JP_JPY_MAX_CONTENT)
		return -1;
	if (bpf_skb_load_bytes(skb, from, sc->payload, len & (SCRATCH - 1)))
		return -1;
	return bpf_skb_store_bytes(skb, to, sc->payload, len & (SCRATCH - 1),
				   BPF_F_RECOMPUTE_CSUM);
}

/* Rewrite addresses, ports and length, and fix the checksum: `added` is the ones' complement
 * sum of the bytes inserted before the payload (or removed: then `remove`), `shift` the
 * payload's move (odd: its sum is byte-swapped). The header pointers are stale after any
 * helper that changes the packet, so everything old is read by the caller first. */
struct rewrite {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;	/* network order */
	__u16 dport;
	__u32 ulen;	/* new UDP length */
};

static __always_inline int fix_checksum(struct __sk_buff *skb, __u32 pseudo_old,
					__u32 hdr_old, __u32 payload_old, __u32 pseudo_new,
					__u32 hdr_new, __u32 payload_new)
{
	__u32 diff;

	diff = csub(pseudo_new, pseudo_old);
	if (bpf_l4_csum_replace(skb, CSUM_OFF, 0, diff, BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0))
		return -1;
	diff = csub(fold((__u64)hdr_new + payload_new), fold((__u64)hdr_old + payload_old));
	return bpf_l4_csum_replace(skb, CSUM_OFF, 0, diff, BPF_F_MARK_MANGLED_0);
}

static __always_inline int write_headers(struct __sk_buff *skb, const struct rewrite *r)
{
	__be16 plen = bpf_htons(r->ulen);
	__u8 hop = HOP_LIMIT;
	/* version 6, traffic class and flow label 0: the pledge's flow label is not carried
	 * onto the backbone (nor the registrar's onto the join link) */
	__be32 first = bpf_htonl(0x60000000);
	struct udphdr u = {
		.source = r->sport,
		.dest = r->dport,
		.len = bpf_htons(r->ulen),
	};

	if (bpf_skb_store_bytes(skb, IP6_OFF, &first, 4, BPF_F_RECOMPUTE_CSUM) ||
	    bpf_skb_store_bytes(skb, IP6_OFF + 4, &plen, 2, BPF_F_RECOMPUTE_CSUM) ||
	    bpf_skb_store_bytes(skb, IP6_OFF + 7, &hop, 1, BPF_F_RECOMPUTE_CSUM) ||
	    bpf_skb_store_bytes(skb, IP6_OFF + 8, r->saddr, 32, BPF_F_RECOMPUTE_CSUM))
		return -1;
	/* the ports and length only: the checksum field is the helpers' */
	return bpf_skb_store_bytes(skb, UDP_OFF, &u, 6, BPF_F_RECOMPUTE_CSUM);
}

/* ------------------------------------------------------------------ join side -- */

SEC("tc")
int jp_jpy_join(struct __sk_buff *skb)
{
	__u32 zero = 0, ifindex = skb->ifindex, len, ulen, n, pfx, i;
	__u32 pseudo_old, hdr_old, payload, hdr_new, pfx_sum, payload_new;
	struct jp_jpy_scratch *sc;
	struct jp_jpy_slot *slot;
	struct jp_jpy_link *link;
	struct jp_jpy_cfg *cfg;
	struct rewrite r;
	struct pkt p;
	__u16 check;

	if (!parse(skb, &p))
		return TC_ACT_OK;
	link = bpf_map_lookup_elem(&jp_jpy_links, &ifindex);
	if (!link || p.udp->dest != bpf_htons(link->port) || !addr_eq(&p.ip6->daddr, link->addr))
		return TC_ACT_OK;
	cfg = bpf_map_lookup_elem(&jp_jpy_cfg, &zero);
	sc = bpf_map_lookup_elem(&jp_jpy_scratch, &zero);
	/* Not relaying (window closed, no registrar) or not from fe80::/64 (the header keeps
	 * only the IID): the daemon's socket decides, and counts. */
	if (!cfg || !sc || !cfg->backbone_ifindex || !link->relay ||
	    p.ip6->saddr.in6_u.u6_addr32[0] != bpf_htonl(0xfe800000) ||
	    p.ip6->saddr.in6_u.u6_addr32[1] != 0)
		return TC_ACT_OK;
	note_source(sc, &p.ip6->saddr, p.udp->source, ifindex);

	ulen = bpf_ntohs(p.udp->len);
	if (ulen < 8 || ulen != bpf_ntohs(p.ip6->payload_len) || skb->len != UDP_OFF + ulen ||
	    p.udp->check == 0) {
		count(JP_JPY_MALFORMED, 0);
		return TC_ACT_SHOT;
	}
	len = ulen - 8;
	if (len > cfg->max_content || len > JP_JPY_MAX_CONTENT) {
		count(JP_JPY_TOO_BIG, 0);
		return TC_ACT_SHOT;
	}
	slot = bpf_map_lookup_elem(&jp_jpy_keys, &cfg->current_slot);
	if (!slot || !slot->live)
		return TC_ACT_OK;	/* no key yet: the daemon's socket relays */

	/* P || P' */
	sc->blocks[0] = 0;
	{
		__u32 be = bpf_htonl(ifindex);

		__builtin_memcpy(sc->blocks + 1, &be, 4);
	}
	__builtin_memcpy(sc->blocks + 5, &p.udp->source, 2);
	__builtin_memcpy(sc->blocks + 7, &p.ip6->saddr.in6_u.u6_addr8[8], 8);
	sc->blocks[15] = slot->key_id;
	__builtin_memcpy(sc->blocks + 16, sc->blocks, 16);
	sc->blocks[16] = 0x80;

	/* the old sums, before any helper moves the packet */
	check = p.udp->check;
	pseudo_old = pseudo_sum(&p.ip6->saddr, &p.ip6->daddr, ulen);
	hdr_old = sum_words(p.udp, 6);
	payload = csub(csub(~check & 0xffff, pseudo_old), hdr_old);

	if (aes(slot, sc, 32, 0))
		return TC_ACT_OK;	/* the kernel refused: let the daemon relay it */

	/* CBOR: array(2), bstr(32) header, bstr(len) content */
	__builtin_memset(sc->prefix, 0, sizeof(sc->prefix));
	sc->prefix[0] = 0x82;
	sc->prefix[1] = 0x58;
	sc->prefix[2] = 32;
	sc->prefix[3] = slot->key_id;
	__builtin_memcpy(sc->prefix + 4, sc->out, 16);
	__builtin_memcpy(sc->prefix + 20, sc->out + 16, 15);
	if (len < 24) {
		sc->prefix[35] = 0x40 | len;
		n = 1;
	} else if (len < 256) {
		sc->prefix[35] = 0x58;
		sc->prefix[36] = len;
		n = 2;
	} else {
		sc->prefix[35] = 0x59;
		sc->prefix[36] = len >> 8;
		sc->prefix[37] = len & 0xff;
		n = 3;
	}
	pfx = 35 + n;
	pfx_sum = sum_words(sc->prefix, 40);	/* zero padded */

	__builtin_memcpy(r.saddr, cfg->backbone_addr, 16);
	__builtin_memcpy(r.daddr, cfg->registrar_addr, 16);
	r.sport = bpf_htons(cfg->src_port);
	r.dport = bpf_htons(cfg->registrar_port);
	r.ulen = ulen + pfx;

	if (bpf_skb_change_tail(skb, skb->len + pfx, 0))
		return TC_ACT_SHOT;	/* nothing moved yet, but the tail may have: drop */
	if (move(skb, sc, PAYLOAD_OFF, PAYLOAD_OFF + pfx, len) ||
	    bpf_skb_store_bytes(skb, PAYLOAD_OFF, sc->prefix, pfx & 63, BPF_F_RECOMPUTE_CSUM) ||
	    write_headers(skb, &r))
		goto send_error;
	{
		struct udphdr u = { .source = r.sport, .dest = r.dport, .len = bpf_htons(r.ulen) };

		hdr_new = sum_words(&u, 6);
	}
	payload_new = fold((__u64)pfx_sum + ((pfx & 1) ? swab16(payload) : payload));
	if (fix_checksum(skb, pseudo_old, hdr_old, payload,
			 pseudo_sum(r.saddr, r.daddr, r.ulen), hdr_new, payload_new))
		goto send_error;
	count(JP_JPY_UP, len);
	i = bpf_redirect_neigh(cfg->backbone_ifindex, NULL, 0, 0);
	return i;
send_error:
	count(JP_JPY_SEND_ERROR, 0);
	return TC_ACT_SHOT;
}

/* ------------------------------------------------------------------ backbone side -- */

SEC("tc")
int jp_jpy_backbone(struct __sk_buff *skb)
{
	__u32 zero = 0, ulen, len, n, pfx, ifindex, i;
	__u32 pseudo_old, hdr_old, payload, hdr_new, pfx_sum, payload_new;
	struct jp_jpy_scratch *sc;
	struct jp_jpy_slot *slot;
	struct jp_jpy_link *link;
	struct jp_jpy_cfg *cfg;
	__u8 head[40];
	struct rewrite r;
	struct pkt p;
	__u16 check, port;
	__u8 kid;

	if (!parse(skb, &p))
		return TC_ACT_OK;
	cfg = bpf_map_lookup_elem(&jp_jpy_cfg, &zero);
	sc = bpf_map_lookup_elem(&jp_jpy_scratch, &zero);
	if (!cfg || !sc || !cfg->src_port || p.udp->dest != bpf_htons(cfg->src_port) ||
	    !addr_eq(&p.ip6->daddr, cfg->backbone_addr))
		return TC_ACT_OK;
	/* from anyone but the registrar's JPY port: the daemon's socket counts it */
	if (p.udp->source != bpf_htons(cfg->registrar_port) ||
	    !addr_eq(&p.ip6->saddr, cfg->registrar_addr))
		return TC_ACT_OK;
	note_source(sc, &p.ip6->saddr, p.udp->source, skb->ifindex);

	ulen = bpf_ntohs(p.udp->len);
	if (ulen < 8 || ulen != bpf_ntohs(p.ip6->payload_len) || skb->len != UDP_OFF + ulen ||
	    p.udp->check == 0) {
		count(JP_JPY_MALFORMED, 0);
		return TC_ACT_SHOT;
	}
	len = ulen - 8;
	if (len < 1)
		goto malformed;
	__builtin_memset(head, 0, sizeof(head));
	if (bpf_skb_load_bytes(skb, PAYLOAD_OFF, head, len < 38 ? (len & 63) : 38))
		goto malformed;
	if (head[0] != 0x82)
		return TC_ACT_OK;	/* not the canonical two-element array: the daemon decodes */
	if (head[1] != 0x58 || head[2] != 32)
		return TC_ACT_OK;	/* not a 32-byte header: not ours to judge */
	if (len < 36)
		goto malformed;		/* cut inside the header or before the content */
	/* content: preferred length encodings only; anything else the daemon decides */
	if (head[35] >= 0x40 && head[35] < 0x58) {
		n = 1;
		i = head[35] - 0x40;
	} else if (head[35] == 0x58) {
		n = 2;
		i = head[36];
	} else if (head[35] == 0x59) {
		n = 3;
		i = ((__u32)head[36] << 8) | head[37];
	} else {
		return TC_ACT_OK;
	}
	pfx = 35 + n;
	if (len < pfx)
		goto malformed;		/* cut inside the length */
	if ((n == 2 && i < 24) || (n == 3 && i < 256))
		return TC_ACT_OK;	/* not the preferred encoding */
	if (len - pfx != i)
		goto malformed;		/* truncated, or bytes after the array */
	len = i;

	kid = head[3];
	slot = find_slot(kid);
	if (!slot) {
		count(JP_JPY_STALE, 0);
		return TC_ACT_SHOT;
	}
	__builtin_memcpy(sc->blocks, head + 4, 16);
	if (aes(slot, sc, 16, 1))
		goto forged;
	/* P: family 0, the key id repeated, a port; then the tag over P' */
	if (sc->out[0] != 0 || sc->out[15] != kid)
		goto forged;
	__builtin_memcpy(sc->blocks, sc->out, 16);
	sc->blocks[0] = 0x80;
	ifindex = ((__u32)sc->out[1] << 24) | ((__u32)sc->out[2] << 16) |
		  ((__u32)sc->out[3] << 8) | sc->out[4];
	__builtin_memcpy(&port, sc->out + 5, 2);
	__builtin_memcpy(r.daddr + 8, sc->out + 7, 8);
	if (aes(slot, sc, 16, 0))
		goto forged;
	{
		__u8 x = 0;
		int k;

#pragma unroll
		for (k = 0; k < 15; k++)
			x |= sc->out[k] ^ head[20 + k];
		if (x)
			goto forged;
	}
	if (port == 0)
		goto forged;
	link = bpf_map_lookup_elem(&jp_jpy_links, &ifindex);
	if (!link) {
		count(JP_JPY_UNSOLICITED, 0);
		return TC_ACT_SHOT;
	}
	/* after the header authenticated, as the daemon does: forgeries never fill the table */
	if (!parse(skb, &p))
		goto malformed;
	__builtin_memset(&sc->replay, 0, sizeof(sc->replay));
	__builtin_memcpy(sc->replay.header, head + 3, 32);
	if (len && bpf_skb_load_bytes(skb, PAYLOAD_OFF + pfx, sc->replay.content,
				      len < 16 ? (len & 15) : 16))
		goto malformed;
	sc->replay.len = len;
	sc->replay.csum = p.udp->check;
	{
		__u64 now = bpf_ktime_get_coarse_ns();
		__u64 *seen = bpf_map_lookup_elem(&jp_jpy_replays, &sc->replay);

		if (seen && now - *seen <= JP_JPY_REPLAY_NS) {
			count(JP_JPY_REPLAYED, 0);
			return TC_ACT_SHOT;
		}
		bpf_map_update_elem(&jp_jpy_replays, &sc->replay, &now, BPF_ANY);
	}

	/* re-parse: the load helpers do not move the packet, but keep the verifier sure */
	if (!parse(skb, &p))
		goto malformed;
	check = p.udp->check;
	pseudo_old = pseudo_sum(&p.ip6->saddr, &p.ip6->daddr, ulen);
	hdr_old = sum_words(p.udp, 6);
	payload = csub(csub(~check & 0xffff, pseudo_old), hdr_old);
	__builtin_memset(sc->prefix, 0, sizeof(sc->prefix));
	__builtin_memcpy(sc->prefix, head, 38);
	if (n < 3)
		sc->prefix[37] = 0;
	if (n < 2)
		sc->prefix[36] = 0;
	pfx_sum = sum_words(sc->prefix, 40);
	/* payload = prefix + content (content at offset pfx): the content's own sum */
	payload_new = csub(payload, pfx_sum);
	if (pfx & 1)
		payload_new = swab16(payload_new);

	__builtin_memcpy(r.saddr, link->addr, 16);
	*(__u64 *)r.daddr = bpf_cpu_to_be64(0xfe80000000000000ULL);
	r.sport = bpf_htons(link->port);
	r.dport = port;
	r.ulen = len + 8;

	if (move(skb, sc, PAYLOAD_OFF + pfx, PAYLOAD_OFF, len) || write_headers(skb, &r) ||
	    bpf_skb_change_tail(skb, skb->len - pfx, 0))
		goto send_error;
	{
		struct udphdr u = { .source = r.sport, .dest = r.dport, .len = bpf_htons(r.ulen) };

		hdr_new = sum_words(&u, 6);
	}
	if (fix_checksum(skb, pseudo_old, hdr_old, payload,
			 pseudo_sum(r.saddr, r.daddr, r.ulen), hdr_new, payload_new))
		goto send_error;
	count(JP_JPY_DOWN, len);
	return bpf_redirect_neigh(ifindex, NULL, 0, 0);
forged:
	count(JP_JPY_FORGED, 0);
	return TC_ACT_SHOT;
malformed:
	count(JP_JPY_MALFORMED, 0);
	return TC_ACT_SHOT;
send_error:
	count(JP_JPY_SEND_ERROR, 0);
	return TC_ACT_SHOT;
}

/* ------------------------------------------------------------------ XDP join side -- */

/* jp_jpy_xdp_join: the wrap of jp_jpy_join before the kernel builds an skb, tail-called from
 * jp_guard (jp_guard_next) on a join link. It does only the common case and hands every other
 * packet on (XDP_PASS) to jp_jpy_join, which then does or refuses it and counts:
 *   - the UDP checksum must verify. A wire frame's does; a locally sent datagram crossing a
 *     veth carries only the pseudo-header sum (CHECKSUM_PARTIAL, completed later by the
 *     stack), which XDP cannot tell apart, and the tc program handles it. So the new checksum
 *     is computed from verified sums and a corrupt datagram is never made valid;
 *   - a next hop known to bpf_fib_lookup out of the backbone (IPv6 forwarding on it), kept
 *     per CPU for JP_JPY_NH_NS: without one, bpf_redirect_neigh in tc resolves it;
 *   - sizes, window, key: anything jp_jpy_join would pass up or drop.
 * The headers move JP_JPY prefix bytes towards the head (bpf_xdp_adjust_head) and the prefix
 * goes between them and the content, which stays where it is. */

#define JP_JPY_NH_NS 100000000ULL	/* a next hop is looked up again after 100 ms */

/* Per CPU: the next hop, and the new frame's head built from it and jp_jpy_cfg once per
 * lookup (Ethernet, IPv6 and UDP headers, CBOR prefix): a packet then writes only its lengths,
 * key id, header blocks and checksum into it. Valid while `cfg` equals jp_jpy_cfg. */
struct jp_jpy_xdp_scratch {
	__u8 frame[PAYLOAD_OFF + 42];	/* + 40 bytes of prefix (zero padded) + 2 spare */
	__u16 pad;
	struct jp_jpy_cfg cfg;		/* what the template was built from */
	__u64 expires;
	__u32 egress;			/* 0: no next hop */
	__u32 fixed;			/* sum of the template's constant pseudo-header and ports */
	__u8 payload[SCRATCH + 4];	/* the content, zero padded to 4 bytes for the sum */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct jp_jpy_xdp_scratch);
} jp_jpy_xdp_scratch SEC(".maps");

/* The ones' complement sum of n bytes (n <= JP_JPY_MAX_CONTENT) of buf, zero padded to 4
 * bytes: 32-bit words added into 64 bits, folded at the end. */
static __always_inline __u32 sum_content(const __u8 *buf, __u32 n)
{
	__u32 words = (n + 3) / 4, i;
	__u64 s = 0;

#pragma nounroll
	for (i = 0; i < (JP_JPY_MAX_CONTENT + 3) / 4; i++) {
		if (i >= words)
			break;
		s += *(const __u32 *)(buf + i * 4);
	}
	return fold(s);
}

static __always_inline int cfg_eq(const struct jp_jpy_cfg *a, const struct jp_jpy_cfg *b)
{
	const __u64 *x = (const void *)a, *y = (const void *)b;
	__u64 d = 0;
	int i;

#pragma unroll
	for (i = 0; i < sizeof(*a) / 8; i++)
		d |= x[i] ^ y[i];
	return d == 0;
}

/* The next hop out of the backbone to the registrar, per CPU, looked up at most every
 * JP_JPY_NH_NS or when jp_jpy_cfg changed; on success the frame template is rebuilt. */
static __always_inline int next_hop(struct xdp_md *ctx, struct jp_jpy_xdp_scratch *x,
				    struct jp_jpy_cfg *cfg)
{
	__u64 now = bpf_ktime_get_coarse_ns();
	struct bpf_fib_lookup fib = {};
	struct ipv6hdr *o;
	struct udphdr *u;
	__u8 *f = x->frame;
	long rc;

	if (now < x->expires && cfg_eq(&x->cfg, cfg))
		return x->egress != 0;
	x->expires = now + JP_JPY_NH_NS;
	__builtin_memcpy(&x->cfg, cfg, sizeof(*cfg));
	x->egress = 0;
	fib.family = 10;	/* AF_INET6 */
	fib.l4_protocol = IPPROTO_UDP;
	fib.ifindex = cfg->backbone_ifindex;
	__builtin_memcpy(fib.ipv6_src, cfg->backbone_addr, 16);
	__builtin_memcpy(fib.ipv6_dst, cfg->registrar_addr, 16);
	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS || fib.ifindex != cfg->backbone_ifindex)
		return 0;
	__builtin_memset(f, 0, sizeof(x->frame));
	__builtin_memcpy(f, fib.dmac, 6);
	__builtin_memcpy(f + 6, fib.smac, 6);
	*(__be16 *)(f + 12) = bpf_htons(ETH_P_IPV6);
	o = (void *)(f + IP6_OFF);
	*(__be32 *)o = bpf_htonl(0x60000000);
	o->nexthdr = IPPROTO_UDP;
	o->hop_limit = HOP_LIMIT;
	__builtin_memcpy(&o->saddr, cfg->backbone_addr, 16);
	__builtin_memcpy(&o->daddr, cfg->registrar_addr, 16);
	u = (void *)(f + UDP_OFF);
	u->source = bpf_htons(cfg->src_port);
	u->dest = bpf_htons(cfg->registrar_port);
	f[PAYLOAD_OFF] = 0x82;
	f[PAYLOAD_OFF + 1] = 0x58;
	f[PAYLOAD_OFF + 2] = 32;
	/* addresses, next header and ports: the per-packet lengths are added to it */
	x->fixed = fold((__u64)sum_words(cfg->backbone_addr, 16) + sum_words(cfg->registrar_addr, 16)
			+ bpf_htons(IPPROTO_UDP) + u->source + u->dest);
	x->egress = fib.ifindex;
	return 1;
}

SEC("xdp")
int jp_jpy_xdp_join(struct xdp_md *ctx)
{
	__u32 zero = 0, ifindex = ctx->ingress_ifindex, len, ulen, n, pfx, content, sum;
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct jp_jpy_xdp_scratch *x;
	struct jp_jpy_scratch *sc;
	struct jp_jpy_slot *slot;
	struct bpf_crypto_ctx *cctx;
	struct bpf_dynptr src, dst;
	struct jp_jpy_link *link;
	struct jp_jpy_cfg *cfg;
	struct jp_jpy_stats *st;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = data + IP6_OFF;
	struct udphdr *udp = data + UDP_OFF;
	__be16 wlen;
	__u64 *blk;
	__u8 *f;

	if ((void *)(udp + 1) > end || eth->h_proto != bpf_htons(ETH_P_IPV6) ||
	    ip6->version != 6 || ip6->nexthdr != IPPROTO_UDP)
		return XDP_PASS;
	link = bpf_map_lookup_elem(&jp_jpy_links, &ifindex);
	if (!link || !link->relay || udp->dest != bpf_htons(link->port) ||
	    !addr_eq(&ip6->daddr, link->addr))
		return XDP_PASS;
	cfg = bpf_map_lookup_elem(&jp_jpy_cfg, &zero);
	sc = bpf_map_lookup_elem(&jp_jpy_scratch, &zero);
	x = bpf_map_lookup_elem(&jp_jpy_xdp_scratch, &zero);
	if (!cfg || !sc || !x || !cfg->backbone_ifindex ||
	    ip6->saddr.in6_u.u6_addr32[0] != bpf_htonl(0xfe800000) ||
	    ip6->saddr.in6_u.u6_addr32[1] != 0)
		return XDP_PASS;
	ulen = bpf_ntohs(udp->len);
	if (ulen < 8 || ulen != bpf_ntohs(ip6->payload_len) || data + UDP_OFF + ulen != end ||
	    udp->check == 0)
		return XDP_PASS;	/* tc counts it malformed */
	len = ulen - 8;
	if (len > cfg->max_content || len > JP_JPY_MAX_CONTENT)
		return XDP_PASS;	/* tc counts it too big */
	slot = bpf_map_lookup_elem(&jp_jpy_keys, &cfg->current_slot);
	if (!slot || !slot->live || !next_hop(ctx, x, cfg))
		return XDP_PASS;

	/* the checksum must verify: see above */
	if (len && bpf_xdp_load_bytes(ctx, PAYLOAD_OFF, x->payload, len))
		return XDP_PASS;
	*(__u32 *)(x->payload + len) = 0;
	content = sum_content(x->payload, len);
	sum = fold((__u64)pseudo_sum(&ip6->saddr, &ip6->daddr, ulen) + sum_words(udp, 8) + content);
	if (sum != 0xffff)
		return XDP_PASS;

	/* P || P', as jp_jpy_join, in two 64-bit words each */
	sc->blocks[0] = 0;
	{
		__u32 be = bpf_htonl(ifindex);

		__builtin_memcpy(sc->blocks + 1, &be, 4);
	}
	__builtin_memcpy(sc->blocks + 5, &udp->source, 2);
	__builtin_memcpy(sc->blocks + 7, &ip6->saddr.in6_u.u6_addr8[8], 8);
	sc->blocks[15] = slot->key_id;
	blk = (__u64 *)sc->blocks;
	blk[2] = blk[0];
	blk[3] = blk[1];
	sc->blocks[16] = 0x80;

	/* C || T straight into the template after the key id; T's 16th byte is then
	 * overwritten by the content's length */
	f = x->frame;
	cctx = slot->ctx;
	if (!cctx)
		return XDP_PASS;
	bpf_dynptr_from_mem(sc->blocks, 32, 0, &src);
	bpf_dynptr_from_mem(f + PAYLOAD_OFF + 4, 32, 0, &dst);
	if (bpf_crypto_encrypt(cctx, &src, &dst, NULL))
		return XDP_PASS;
	f[PAYLOAD_OFF + 3] = slot->key_id;
	f[PAYLOAD_OFF + 36] = 0;
	f[PAYLOAD_OFF + 37] = 0;
	if (len < 24) {
		f[PAYLOAD_OFF + 35] = 0x40 | len;
		n = 1;
	} else if (len < 256) {
		f[PAYLOAD_OFF + 35] = 0x58;
		f[PAYLOAD_OFF + 36] = len;
		n = 2;
	} else {
		f[PAYLOAD_OFF + 35] = 0x59;
		f[PAYLOAD_OFF + 36] = len >> 8;
		f[PAYLOAD_OFF + 37] = len & 0xff;
		n = 3;
	}
	pfx = 35 + n;
	wlen = bpf_htons(ulen + pfx);
	*(__be16 *)(f + IP6_OFF + 4) = wlen;
	*(__be16 *)(f + UDP_OFF + 4) = wlen;
	/* checksum: the template's constant sum, the length twice (pseudo-header and UDP
	 * header), the prefix (zero padded to 40 bytes, at an even offset) and the content (at
	 * offset pfx: its sum byte-swapped when pfx is odd) */
	sum = fold((__u64)x->fixed + wlen + wlen + sum_words(f + PAYLOAD_OFF, 40) +
		   ((pfx & 1) ? swab16(content) : content));
	sum = ~sum & 0xffff;
	*(__u16 *)(f + CSUM_OFF) = sum ? sum : 0xffff;

	if (bpf_xdp_adjust_head(ctx, -(int)pfx))
		return XDP_PASS;
	if (n == 1)
		n = bpf_xdp_store_bytes(ctx, 0, f, PAYLOAD_OFF + 36);
	else if (n == 2)
		n = bpf_xdp_store_bytes(ctx, 0, f, PAYLOAD_OFF + 37);
	else
		n = bpf_xdp_store_bytes(ctx, 0, f, PAYLOAD_OFF + 38);
	st = bpf_map_lookup_elem(&jp_jpy_stats, &zero);
	if (n) {	/* cannot happen (the frame was checked): it is half rewritten */
		if (st)
			st->n[JP_JPY_SEND_ERROR]++;
		return XDP_DROP;
	}
	if (st) {
		st->n[JP_JPY_UP]++;
		st->bytes_up += len;
		st->xdp_up++;
	}
	return bpf_redirect(x->egress, 0);
}
