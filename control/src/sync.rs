//! Desired state -> diff against what is live -> one publish.
//!
//! Only service ports whose compiled spec changed are re-compiled into the
//! tables (O(changed)); an unchanged sync publishes nothing. A service the
//! tables refuse (it clashes with one already live) is reported and left
//! out; everything else still applies.

use std::collections::BTreeMap;
use std::sync::Arc;

use dataplane::tables::{ServiceSpec, TableError};
use dataplane::Publisher;
use runtime::host::HostFacts;

use crate::compile::{Desired, NodeFacts, Problem};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    /// Problems from compilation plus services the tables refused.
    pub problems: Vec<Problem>,
    /// The generation published, if anything changed.
    pub published: Option<u64>,
}

impl SyncReport {
    pub fn changes(&self) -> usize {
        self.added + self.updated + self.removed
    }
}

/// Owns the publisher and remembers what is live.
pub struct Syncer {
    publisher: Publisher,
    live: BTreeMap<String, Arc<ServiceSpec>>,
    live_nodes: NodeFacts,
    live_host: Option<HostFacts>,
}

impl Syncer {
    pub fn new(publisher: Publisher) -> Self {
        Syncer {
            publisher,
            live: BTreeMap::new(),
            live_nodes: NodeFacts::default(),
            live_host: None,
        }
    }

    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    pub fn live(&self) -> &BTreeMap<String, Arc<ServiceSpec>> {
        &self.live
    }

    pub fn apply(&mut self, desired: Desired) -> SyncReport {
        let mut report = SyncReport {
            problems: desired.problems,
            ..SyncReport::default()
        };
        let mut draft = self.publisher.draft();
        let removed: Vec<String> = self
            .live
            .keys()
            .filter(|k| !desired.services.contains_key(*k))
            .cloned()
            .collect();
        for name in removed {
            self.remove(&mut draft, &name, &mut report);
        }
        for spec in desired.services.into_values() {
            self.upsert(&mut draft, spec, &mut report);
        }
        let nodes_changed = desired.nodes != self.live_nodes;
        if nodes_changed {
            apply_nodes(&mut draft, &self.live_nodes, &desired.nodes);
            self.live_nodes = desired.nodes;
        }
        if report.changes() > 0 || nodes_changed {
            report.published = Some(self.publisher.publish(draft));
        }
        report
    }
}

impl Syncer {
    /// Incremental sync: replaces the ports of the given services (key ->
    /// its compiled ports; empty when deleted) and publishes once. Cost is
    /// proportional to the services given, not to all live ones.
    pub fn apply_services(&mut self, updates: Vec<(crate::objects::ObjectKey, Vec<Arc<ServiceSpec>>)>) -> SyncReport {
        let mut report = SyncReport::default();
        let mut draft = self.publisher.draft();
        for (key, ports) in updates {
            let prefix = format!("{key}:");
            let old: Vec<String> = self
                .live
                .range(prefix.clone()..)
                .take_while(|(name, _)| name.starts_with(&prefix))
                .map(|(name, _)| name.clone())
                .filter(|name| !ports.iter().any(|p| &p.name == name))
                .collect();
            for name in old {
                self.remove(&mut draft, &name, &mut report);
            }
            for spec in ports {
                self.upsert(&mut draft, spec, &mut report);
            }
        }
        if report.changes() > 0 {
            report.published = Some(self.publisher.publish(draft));
        }
        report
    }
}

impl Syncer {
    fn remove(&mut self, draft: &mut dataplane::Tables, name: &str, report: &mut SyncReport) {
        if let Some(old) = self.live.remove(name) {
            draft.remove_service(old.id);
            report.removed += 1;
        }
    }

    /// Adds or updates one service port unless it is unchanged; a port the
    /// tables refuse (it clashes with a live one) becomes a problem.
    fn upsert(&mut self, draft: &mut dataplane::Tables, spec: Arc<ServiceSpec>, report: &mut SyncReport) {
        let existed = match self.live.get(&spec.name) {
            Some(old) if Arc::ptr_eq(old, &spec) || **old == *spec => return,
            Some(_) => true,
            None => false,
        };
        match draft.upsert_service(&spec) {
            Ok(()) => {
                if existed {
                    report.updated += 1;
                } else {
                    report.added += 1;
                }
                self.live.insert(spec.name.clone(), spec);
            }
            Err(e) => report.problems.push(refused(&spec.name, e)),
        }
    }
}

impl Syncer {
    /// The kernel's facts (ports, uplink subnet and gateway, local pods,
    /// neighbours) into the tables; publishes only if they changed. Node
    /// addresses from Node objects win; the uplink's address is the fallback
    /// when there are none (manifests without Node objects).
    pub fn apply_host(&mut self, facts: HostFacts) -> Option<u64> {
        if self.live_host.as_ref() == Some(&facts) {
            return None;
        }
        let mut draft = self.publisher.draft();
        runtime::host::apply(&mut draft, self.live_host.as_ref(), &facts);
        self.live_host = Some(facts);
        Some(self.publisher.publish(draft))
    }
}

/// Pod routes to other nodes, and this node's addresses (where NodePorts
/// answer, the first being the VXLAN endpoint and SNAT source).
fn apply_nodes(draft: &mut dataplane::Tables, old: &NodeFacts, new: &NodeFacts) {
    for (name, (cidr, _)) in &old.remote {
        if !new.remote.contains_key(name) {
            draft.remove_pod_route(*cidr);
        }
    }
    for (name, (cidr, remote)) in &new.remote {
        if old.remote.get(name) != Some(&(*cidr, *remote)) {
            if let Some((old_cidr, _)) = old.remote.get(name) {
                draft.remove_pod_route(*old_cidr);
            }
            draft.set_pod_route(*cidr, *remote);
        }
    }
    if !new.node_ips.is_empty() && new.node_ips != draft.node().node_ips {
        let mut node = draft.node().clone();
        node.node_ips = new.node_ips.clone();
        node.snat_ip = new.node_ips[0];
        draft.set_node(node);
    }
}

fn refused(name: &str, e: TableError) -> Problem {
    Problem {
        object: format!("Service port {name}"),
        reason: e.to_string(),
    }
}
