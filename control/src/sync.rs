//! Desired state -> diff against what is live -> one publish.
//!
//! Only service ports whose compiled spec changed are re-compiled into the
//! tables (O(changed)); an unchanged sync publishes nothing. A service the
//! tables refuse (it clashes with one already live) is reported and left
//! out; everything else still applies.

use std::collections::BTreeMap;

use dataplane::tables::{ServiceSpec, TableError};
use dataplane::Publisher;

use crate::compile::{Desired, Problem};

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
    live: BTreeMap<String, ServiceSpec>,
}

impl Syncer {
    pub fn new(publisher: Publisher) -> Self {
        Syncer {
            publisher,
            live: BTreeMap::new(),
        }
    }

    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    pub fn live(&self) -> &BTreeMap<String, ServiceSpec> {
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
            if let Some(old) = self.live.remove(&name) {
                draft.remove_service(old.id);
                report.removed += 1;
            }
        }
        for (name, spec) in desired.services {
            let existed = match self.live.get(&name) {
                Some(old) if *old == spec => continue,
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
                    self.live.insert(name, spec);
                }
                Err(e) => report.problems.push(refused(&name, e)),
            }
        }
        if report.changes() > 0 {
            report.published = Some(self.publisher.publish(draft));
        }
        report
    }
}

fn refused(name: &str, e: TableError) -> Problem {
    Problem {
        object: format!("Service port {name}"),
        reason: e.to_string(),
    }
}
