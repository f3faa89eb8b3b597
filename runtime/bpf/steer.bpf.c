// SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause)
// kxp's XDP program: steer to AF_XDP only the packets kxp handles, pass
// everything else to the kernel untouched (XDP_PASS is also the fallback
// when no socket is bound to the receive queue).
//
// kxp's packets, each by exact match:
// - TCP/UDP to a service frontend (ClusterIP, LB, externalIP : port / proto)
//   or to a NodePort on a node address;
// - replies of kxp's own flows: the tuple is in the reply index, which the
//   workers keep (every reply tuple of their conntrack, in memory they
//   share with this program);
// - ICMP errors about kxp's flows: the quoted packet is one kxp sent, either
//   toward a backend (its reverse is in the reply index) or from a frontend
//   or NodePort (a reply kxp un-NATed);
// - VXLAN to this node, on the uplink, from a known node, unless it carries
//   a packet for this node's own stack (its overlay address) that is no
//   reply of kxp's: that is the kernel's VXLAN device's;
// - pod traffic to another node's pod CIDR (kxp is the overlay);
// - later fragments of a datagram whose first fragment was kxp's.
// Everything else, the node's own connections and their ICMP errors
// included, is the kernel's. Maps are filled from kxp's published tables.
//
// Written without CO-RE or vmlinux.h: the kernels kxp targets may not
// expose BTF.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* One program serves every port kxp attaches it to; ports are numbered
 * (slots) and each port's queues have their own XSKMAP entries. */
#define MAX_PORTS 1024
#define MAX_QUEUES 16

struct l4_key {
	__u32 ip;   /* network order */
	__u16 port; /* network order */
	__u8 proto;
	__u8 pad;
};

struct lpm_key {
	__u32 prefixlen;
	__u32 ip; /* network order */
};

struct config {
	__u64 index_seed;    /* the reply index's hash seed */
	__u32 index_mask;    /* its buckets - 1 */
	__u16 node_port_lo;  /* host order */
	__u16 node_port_hi;
	__u16 vxlan_port;    /* host order; 0 = no overlay */
	__u16 pad[3];
};

enum stat { STAT_SEEN, STAT_REDIRECTED, STAT_PASSED, STAT_MAX };

/* AF_XDP sockets by slot * MAX_QUEUES + receive queue. */
struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, MAX_PORTS * MAX_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

struct port {
	__u32 slot;
	__u32 is_pod; /* faces a local pod: its traffic to other nodes' pods is kxp's */
};

/* kxp's ports by ifindex. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PORTS);
	__type(key, __u32);
	__type(value, struct port);
} ports SEC(".maps");

/* A set: membership is all the program asks of these maps (the value is
 * unused). They allocate as they fill: memory follows the entries. */
#define SET(name, key_type, max)                        \
	struct {                                        \
		__uint(type, BPF_MAP_TYPE_HASH);        \
		__uint(max_entries, max);               \
		__type(key, key_type);                  \
		__type(value, __u8);                    \
		__uint(map_flags, BPF_F_NO_PREALLOC);   \
	} name SEC(".maps")

/* Service frontends, by address, port, protocol. */
SET(frontends, struct l4_key, 1 << 20);
/* Addresses NodePorts answer on. */
SET(node_ips, __u32, 256);
/* Every address of this host's stack (node_ips, its overlay address, pod
 * gateway addresses): overlay traffic to them is the kernel's unless it is
 * a reply of kxp's. */
SET(host_addrs, __u32, 1024);
/* NodePorts by (port, proto): key.ip is 0. */
SET(node_ports, struct l4_key, 1 << 16);
/* Other nodes' underlay addresses: the only sources VXLAN is taken from. */
SET(overlay_peers, __u32, 1 << 14);

/* Datagrams whose first fragment was steered to kxp: their later
 * fragments (no ports to judge by) follow it. Written here, by the
 * program itself, as it steers a first fragment; LRU, so it never fills. */
struct frag_key {
	__u32 saddr;
	__u32 daddr;
	__u16 id;
	__u8 proto;
	__u8 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1 << 14);
	__type(key, struct frag_key);
	__type(value, __u8);
} frag_flows SEC(".maps");

/* The reply index (dataplane/src/flow/reply_index.rs has the layout and
 * the concurrency rules; this code must match it bit for bit): buckets of
 * 8 entries, each entry two words, written by kxp's workers through a
 * shared mapping. Sized at load time. */
#define INDEX_ENTRIES 8
struct reply_bucket {
	__u64 w[2 * INDEX_ENTRIES];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct reply_bucket);
	__uint(map_flags, BPF_F_MMAPABLE);
} reply_index SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1 << 14);
	__type(key, struct lpm_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} remote_pods SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} settings SEC(".maps");


struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &which);
	if (v)
		*v += 1;
}

static __always_inline int in_range(__u16 port_be, __u16 lo, __u16 hi)
{
	__u16 p = bpf_ntohs(port_be);
	return lo && p >= lo && p <= hi;
}

#define READ_ONCE_U64(x) (*(volatile __u64 *)&(x))

static __always_inline __u64 key_hash(__u64 seed, __u64 w0, __u64 w1)
{
	__u64 h = ((w0 ^ seed) * 0x9E3779B97F4A7C15ULL) ^ w1;
	h ^= h >> 33;
	h *= 0xFF51AFD7ED558CCDULL;
	h ^= h >> 33;
	h *= 0xC4CEB9FE1A85EC53ULL;
	return h ^ (h >> 33);
}

static __always_inline int bucket_has(__u32 b, __u64 w0, __u64 w1)
{
	struct reply_bucket *bk = bpf_map_lookup_elem(&reply_index, &b);
	if (!bk)
		return 0;
#pragma unroll
	for (int i = 0; i < INDEX_ENTRIES; i++) {
		/* Word 1 first: a writer stores it last. */
		if (READ_ONCE_U64(bk->w[2 * i + 1]) == w1 && READ_ONCE_U64(bk->w[2 * i]) == w0)
			return 1;
	}
	return 0;
}

/* Whether saddr:sport -> daddr:dport (network order) is the reply tuple of
 * one of kxp's flows. */
static __always_inline int is_reply(struct config *cfg, __u32 saddr, __u32 daddr, __u16 sport, __u16 dport,
				    __u8 proto)
{
	__u64 w0 = ((__u64)bpf_ntohl(saddr) << 32) | bpf_ntohl(daddr);
	__u64 w1 = ((__u64)bpf_ntohs(sport) << 48) | ((__u64)bpf_ntohs(dport) << 32) | ((__u64)proto << 8) | 1;
	__u64 h = key_hash(cfg->index_seed, w0, w1);
	return bucket_has(h & cfg->index_mask, w0, w1) || bucket_has((h >> 32) & cfg->index_mask, w0, w1);
}

static __always_inline struct frag_key frag_key_of(struct iphdr *ip)
{
	struct frag_key k = {
		.saddr = ip->saddr, .daddr = ip->daddr, .id = ip->id, .proto = ip->protocol, .pad = 0,
	};
	return k;
}

/* Whether VXLAN from a known node, whose payload starts at `inner`, is
 * kxp's: all of it except packets for this node's own stack (its overlay
 * address: the node's own connections through the kernel's VXLAN device)
 * that are not replies of kxp's flows. */
static __always_inline int overlay_is_kxps(struct config *cfg, void *inner, void *end)
{
	struct ethhdr *eth = inner;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return 1; /* kxp drops and counts what it cannot use */
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl != 5)
		return 1;
	if (!bpf_map_lookup_elem(&host_addrs, &ip->daddr))
		return 1;
	if ((ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP) || (ip->frag_off & bpf_htons(0x1fff)))
		return 0;
	__u16 *ports = (void *)(ip + 1);
	if ((void *)(ports + 2) > end)
		return 0;
	return is_reply(cfg, ip->saddr, ip->daddr, ports[0], ports[1], ip->protocol);
}

/* Whether an ICMP error quoting `q` (the start of the packet it is about)
 * is about one of kxp's flows. */
static __always_inline int icmp_error_is_kxps(struct config *cfg, struct iphdr *q, void *end)
{
	if ((void *)(q + 1) > end || q->ihl < 5)
		return 0;
	if (q->protocol != IPPROTO_TCP && q->protocol != IPPROTO_UDP)
		return 0;
	__u16 *ports = (void *)q + q->ihl * 4;
	if ((void *)(ports + 2) > end)
		return 0;
	/* A packet kxp sent toward a backend: its reply tuple is indexed. */
	if (is_reply(cfg, q->daddr, q->saddr, ports[1], ports[0], q->protocol))
		return 1;
	/* A reply kxp un-NATed, from a frontend or a NodePort. */
	struct l4_key f = { .ip = q->saddr, .port = ports[0], .proto = q->protocol };
	if (bpf_map_lookup_elem(&frontends, &f))
		return 1;
	struct l4_key np = { .ip = 0, .port = ports[0], .proto = q->protocol };
	return bpf_map_lookup_elem(&node_ips, &q->saddr) && bpf_map_lookup_elem(&node_ports, &np);
}

/* Whether the frame is kxp's; *first_frag gets its datagram's key when it
 * is a first fragment (proto stays 0 otherwise). A key, not a pointer into
 * the packet: the compiler turns a conditional packet pointer into
 * arithmetic the verifier refuses. */
static __always_inline int kxps(struct xdp_md *ctx, struct port *port, struct frag_key *first_frag)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 zero = 0;

	if ((void *)(eth + 1) > end)
		return 0;
	__u16 proto = eth->h_proto;
	void *l3 = eth + 1;
	if (proto == bpf_htons(ETH_P_8021Q)) {
		if (l3 + 4 > end)
			return 0;
		proto = *(__u16 *)(l3 + 2);
		l3 += 4;
	}
	if (proto != bpf_htons(ETH_P_IP))
		return 0;
	struct iphdr *ip = l3;
	if ((void *)(ip + 1) > end || ip->ihl < 5)
		return 0;
	/* A later fragment has no ports: it is kxp's when its datagram's first
	 * fragment was (frag_flows). A first fragment carries the L4 header and
	 * is judged like any packet. */
	if (ip->frag_off & bpf_htons(0x1fff)) {
		struct frag_key fk = frag_key_of(ip);
		return bpf_map_lookup_elem(&frag_flows, &fk) != 0;
	}
	if (ip->frag_off & bpf_htons(0x2000))
		*first_frag = frag_key_of(ip);
	struct config *cfg = bpf_map_lookup_elem(&settings, &zero);
	if (!cfg)
		return 0;
	__u32 dst = ip->daddr;
	__u8 l4proto = ip->protocol;
	void *l4 = (void *)ip + ip->ihl * 4;

	if (l4proto == IPPROTO_TCP || l4proto == IPPROTO_UDP) {
		if (l4 + 4 > end)
			return 0;
		__u16 sport = *(__u16 *)l4;
		__u16 dport = *(__u16 *)(l4 + 2);
		struct l4_key k = { .ip = dst, .port = dport, .proto = l4proto };
		if (bpf_map_lookup_elem(&frontends, &k))
			return 1;
		if (bpf_map_lookup_elem(&node_ips, &dst)) {
			/* VXLAN only on the underlay and only from a known node:
			 * anything else is the kernel's (and never reaches a
			 * ClusterIP through kxp). */
			if (l4proto == IPPROTO_UDP && cfg->vxlan_port && bpf_ntohs(dport) == cfg->vxlan_port) {
				if (port->is_pod || !bpf_map_lookup_elem(&overlay_peers, &ip->saddr))
					return 0;
				/* UDP (8) + VXLAN (8) headers. */
				return overlay_is_kxps(cfg, l4 + 16, end);
			}
			if (in_range(dport, cfg->node_port_lo, cfg->node_port_hi)) {
				struct l4_key np = { .ip = 0, .port = dport, .proto = l4proto };
				if (bpf_map_lookup_elem(&node_ports, &np))
					return 1;
			}
		}
		if (is_reply(cfg, ip->saddr, dst, sport, dport, l4proto))
			return 1;
	} else if (l4proto == IPPROTO_ICMP) {
		/* Only errors (unreachable, time exceeded, parameter problem) quote
		 * a flow; pings to the node stay the kernel's. */
		if (l4 + 8 > end)
			return 0;
		__u8 type = *(__u8 *)l4;
		if ((type == 3 || type == 11 || type == 12) && icmp_error_is_kxps(cfg, l4 + 8, end))
			return 1;
	}
	struct lpm_key pk = { .prefixlen = 32, .ip = dst };
	if (port->is_pod && bpf_map_lookup_elem(&remote_pods, &pk))
		return 1;
	return 0;
}

SEC("xdp")
int kxp_steer(struct xdp_md *ctx)
{
	count(STAT_SEEN);
	__u32 ifindex = ctx->ingress_ifindex;
	struct port *port = bpf_map_lookup_elem(&ports, &ifindex);
	struct frag_key first_frag = {};
	if (!port || ctx->rx_queue_index >= MAX_QUEUES || !kxps(ctx, port, &first_frag)) {
		count(STAT_PASSED);
		return XDP_PASS;
	}
	if (first_frag.proto) {
		__u8 one = 1;
		bpf_map_update_elem(&frag_flows, &first_frag, &one, BPF_ANY);
	}
	count(STAT_REDIRECTED);
	return bpf_redirect_map(&xsks, port->slot * MAX_QUEUES + ctx->rx_queue_index, XDP_PASS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
