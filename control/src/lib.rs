//! kxp's control process: reads cluster state (Kubernetes objects, from YAML
//! manifests today and from the API server with kube-rs next), compiles it
//! into the dataplane's tables and publishes only what changed.
//!
//! - [`objects`]: the Services, EndpointSlices and Nodes kxp reads.
//! - [`manifests`]: loading those objects from a directory of YAML.
//! - [`compile`]: objects -> desired service ports, with every unusable
//!   object reported by name and skipped.
//! - [`sync`]: desired state -> diff -> one publish.

pub mod compile;
pub mod config;
pub mod daemon;
pub mod health;
pub mod http;
pub mod kube_source;
pub mod latency_log;
pub mod manifests;
pub mod metrics;
pub mod objects;
pub mod runner;
pub mod source;
pub mod sync;
