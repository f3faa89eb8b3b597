//! The one table of the ports kxp serves. A port's identity is its
//! `PortId` (its index here, which is also its slot in the steering
//! program's maps and its index in every worker's socket set and in the
//! engine's `NodeConfig::ports`) bound to the interface index the kernel
//! gave the interface when kxp took it. Everything else asks this table:
//! the steering program, the workers and the kernel-facts reader are
//! handed a `PortId` (and the `Port` it names), never a name to resolve
//! on their own, so they cannot disagree about which interface a port is.
//!
//! The interface index, not the name, is the identity: a pod's veth
//! deleted and re-created under the same name (a CNI restarting a pod) is
//! a new interface, and the old port is `stale` until it is removed.

use std::collections::HashMap;

use dataplane::addr::PortId;
use dataplane::tables::PortRole;

use crate::netlink::LinkInfo;
use crate::steering::MAX_PORTS;

/// One interface kxp serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub name: String,
    pub role: PortRole,
    /// The kernel's index of the interface when kxp took it.
    pub ifindex: u32,
}

/// The ports by `PortId`; a removed port leaves a hole that the next new
/// port fills, so ids stay small and the maps stay dense.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortTable {
    slots: Vec<Option<Port>>,
}

#[derive(Debug, thiserror::Error)]
#[error("kxp serves at most {MAX_PORTS} interfaces; {0} cannot be added")]
pub struct PortTableFull(pub String);

impl PortTable {
    /// Adds `port` at the first hole (or the end); returns its id.
    pub fn insert(&mut self, port: Port) -> Result<PortId, PortTableFull> {
        let at = self.slots.iter().position(Option::is_none).unwrap_or(self.slots.len());
        if at >= MAX_PORTS as usize {
            return Err(PortTableFull(port.name));
        }
        if at == self.slots.len() {
            self.slots.push(Some(port));
        } else {
            self.slots[at] = Some(port);
        }
        Ok(PortId(at as u16))
    }

    pub fn remove(&mut self, id: PortId) -> Option<Port> {
        self.slots.get_mut(usize::from(id.0)).and_then(Option::take)
    }

    pub fn get(&self, id: PortId) -> Option<&Port> {
        self.slots.get(usize::from(id.0)).and_then(Option::as_ref)
    }

    /// Ids run from 0 to `len() - 1`, holes included.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    /// Every port with its id, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (PortId, &Port)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (PortId(i as u16), p)))
    }

    /// The port serving interface `name`, if any.
    pub fn find(&self, name: &str) -> Option<PortId> {
        self.iter().find(|(_, p)| p.name == name).map(|(id, _)| id)
    }

    /// The first port with `role`.
    pub fn with_role(&self, role: PortRole) -> Option<PortId> {
        self.iter().find(|(_, p)| p.role == role).map(|(id, _)| id)
    }

    /// Pod ports whose interface is gone, or was re-created (same name, new
    /// index), given the namespace's `links`.
    pub fn stale(&self, links: &HashMap<String, LinkInfo>) -> Vec<PortId> {
        self.iter()
            .filter(|(_, p)| p.role == PortRole::Pod)
            .filter(|(_, p)| links.get(&p.name).is_none_or(|l| l.ifindex != p.ifindex))
            .map(|(id, _)| id)
            .collect()
    }
}

/// `table[id]` for an id the caller just got from the table.
impl std::ops::Index<PortId> for PortTable {
    type Output = Port;

    fn index(&self, id: PortId) -> &Port {
        self.get(id).unwrap_or_else(|| panic!("no port {}", id.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: &str, role: PortRole, ifindex: u32) -> Port {
        Port {
            name: name.into(),
            role,
            ifindex,
        }
    }

    fn link(ifindex: u32) -> LinkInfo {
        LinkInfo {
            ifindex,
            mac: dataplane::addr::Mac::default(),
            mtu: 1500,
            rx_queues: 1,
            xdp_attached: false,
        }
    }

    #[test]
    fn a_removed_port_leaves_a_hole_the_next_one_fills() {
        let mut t = PortTable::default();
        assert_eq!(t.insert(port("eth0", PortRole::Uplink, 2)).unwrap(), PortId(0));
        assert_eq!(t.insert(port("vp1", PortRole::Pod, 5)).unwrap(), PortId(1));
        assert_eq!(t.insert(port("vp2", PortRole::Pod, 6)).unwrap(), PortId(2));
        assert_eq!(t.remove(PortId(1)).unwrap().name, "vp1");
        assert_eq!(t.find("vp1"), None);
        assert_eq!(t.insert(port("vp3", PortRole::Pod, 7)).unwrap(), PortId(1));
        assert_eq!(t.len(), 3);
        assert_eq!(t.with_role(PortRole::Uplink), Some(PortId(0)));
    }

    #[test]
    fn a_pod_interface_recreated_under_its_name_is_stale() {
        let mut t = PortTable::default();
        t.insert(port("eth0", PortRole::Uplink, 2)).unwrap();
        t.insert(port("vp1", PortRole::Pod, 5)).unwrap();
        t.insert(port("vp2", PortRole::Pod, 6)).unwrap();
        t.insert(port("vp3", PortRole::Pod, 7)).unwrap();
        // vp1 unchanged, vp2 re-created, vp3 gone; the uplink is never stale.
        let links = HashMap::from([("vp1".to_string(), link(5)), ("vp2".to_string(), link(9))]);
        assert_eq!(t.stale(&links), vec![PortId(2), PortId(3)]);
    }

    #[test]
    fn the_table_refuses_more_ports_than_the_maps_hold() {
        let mut t = PortTable::default();
        for i in 0..MAX_PORTS {
            t.insert(port(&format!("p{i}"), PortRole::Pod, i)).unwrap();
        }
        let err = t.insert(port("one-too-many", PortRole::Pod, 0)).unwrap_err();
        assert!(err.to_string().contains("one-too-many"), "{err}");
    }
}
