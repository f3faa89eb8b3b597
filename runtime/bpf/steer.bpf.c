// SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause)
// kxp's XDP program: steer to AF_XDP only the packets kxp handles, pass
// everything else to the kernel untouched (XDP_PASS is also the fallback
// when no socket is bound to the receive queue).
//
// kxp's packets: destinations in the service frontend set (ClusterIP, LB,
// externalIP : port / proto); NodePorts on node addresses; VXLAN to this
// node from a known node, on the uplink; replies to NATed flows (from a backend endpoint, to a client that is
// not this node or to the SNAT port range); ICMP errors to frontend or SNAT
// addresses; pod traffic to another node's pod CIDR; later fragments of a
// datagram whose first fragment was kxp's. Maps are filled from kxp's
// published tables.
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
	__u32 snat_ip;       /* network order; 0 = none */
	__u16 snat_port_lo;  /* host order */
	__u16 snat_port_hi;
	__u16 node_port_lo;
	__u16 node_port_hi;
	__u16 vxlan_port;    /* host order; 0 = no overlay */
	__u16 pad;
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

/* Service frontends and backend endpoints, by address, port, protocol. */
SET(frontends, struct l4_key, 1 << 20);
SET(backends, struct l4_key, 1 << 20);
/* Frontend addresses alone (ICMP errors about service flows). */
SET(frontend_ips, __u32, 1 << 18);
/* Addresses NodePorts answer on. */
SET(node_ips, __u32, 256);
/* Every address of this host's stack (node_ips and e.g. pod gateway
 * addresses): replies to the host's own connections stay the kernel's. */
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

static __always_inline struct frag_key frag_key_of(struct iphdr *ip)
{
	struct frag_key k = {
		.saddr = ip->saddr, .daddr = ip->daddr, .id = ip->id, .proto = ip->protocol, .pad = 0,
	};
	return k;
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
			if (l4proto == IPPROTO_UDP && cfg->vxlan_port && bpf_ntohs(dport) == cfg->vxlan_port)
				return !port->is_pod && bpf_map_lookup_elem(&overlay_peers, &ip->saddr);
			if (in_range(dport, cfg->node_port_lo, cfg->node_port_hi)) {
				struct l4_key np = { .ip = 0, .port = dport, .proto = l4proto };
				if (bpf_map_lookup_elem(&node_ports, &np))
					return 1;
			}
		}
		/* Replies come from a backend endpoint: to the client it was
		 * DNATed for (never this host), or to the SNAT port range on this
		 * node. The node's own connections to a backend (kubelet probes,
		 * host processes) and the node's own servers stay the kernel's. */
		struct l4_key b = { .ip = ip->saddr, .port = sport, .proto = l4proto };
		if (bpf_map_lookup_elem(&backends, &b)) {
			if (!bpf_map_lookup_elem(&node_ips, &dst) && !bpf_map_lookup_elem(&host_addrs, &dst))
				return 1;
			if (cfg->snat_ip && dst == cfg->snat_ip &&
			    in_range(dport, cfg->snat_port_lo, cfg->snat_port_hi))
				return 1;
		}
	} else if (l4proto == IPPROTO_ICMP) {
		/* Only errors (unreachable, time exceeded, parameter problem) quote
		 * a flow kxp may have NATed; pings to the node stay the kernel's. */
		if (l4 + 1 > end)
			return 0;
		__u8 type = *(__u8 *)l4;
		if ((type == 3 || type == 11 || type == 12) &&
		    (bpf_map_lookup_elem(&frontend_ips, &dst) || (cfg->snat_ip && dst == cfg->snat_ip)))
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
