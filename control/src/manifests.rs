//! Cluster objects from a directory of YAML manifests: multi-document files
//! and `kind: List`, as `kubectl get -o yaml` writes them.
//!
//! A document that is not valid YAML, or that does not deserialize as the
//! kind it claims, fails the whole load with an error naming the file and
//! the document: the caller keeps the tables it had. Kinds kxp does not read
//! (Deployments, ConfigMaps, ...) are ignored, so the directory can hold a
//! whole application.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;

use crate::objects::{key_of, ClusterObjects};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest directory {dir}: {source}")]
    Dir { dir: PathBuf, source: std::io::Error },
    #[error("cannot read {file}: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{file}, document {doc}: {reason}")]
    Document { file: PathBuf, doc: usize, reason: String },
}

/// Reads every `*.yaml` / `*.yml` / `*.json` file of `dir` (not recursive,
/// hidden files skipped), in name order.
pub fn load_dir(dir: &Path) -> Result<ClusterObjects, ManifestError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ManifestError::Dir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let hidden = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            !hidden && p.is_file() && matches!(ext, "yaml" | "yml" | "json")
        })
        .collect();
    files.sort();
    let mut objs = ClusterObjects::default();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| ManifestError::Read {
            file: file.clone(),
            source,
        })?;
        load_str(&text, &mut objs).map_err(|(doc, reason)| ManifestError::Document {
            file: file.clone(),
            doc,
            reason,
        })?;
    }
    Ok(objs)
}

/// Adds the objects of one (multi-document) YAML text. On error returns the
/// 1-based document number and the reason.
pub fn load_str(text: &str, objs: &mut ClusterObjects) -> Result<(), (usize, String)> {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| (n, format!("not valid YAML: {e}")))?;
        add_value(value, objs).map_err(|reason| (n, reason))?;
    }
    Ok(())
}

fn add_value(value: serde_yaml::Value, objs: &mut ClusterObjects) -> Result<(), String> {
    if value.is_null() {
        return Ok(()); // an empty document (e.g. a trailing `---`)
    }
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
    let api = value
        .get("apiVersion")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_string();
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("<unnamed>")
        .to_string();
    let bad = |e: serde_yaml::Error| format!("{kind} {name}: {e}");
    match (kind.as_str(), api.as_str()) {
        _ if kind.ends_with("List") => {
            let items = value
                .get("items")
                .and_then(|i| i.as_sequence())
                .cloned()
                .unwrap_or_default();
            for item in items {
                add_value(item, objs)?;
            }
        }
        ("Service", "v1") => {
            let s: Service = serde_yaml::from_value(value).map_err(bad)?;
            objs.services.insert(key_of(&s.metadata), s);
        }
        ("EndpointSlice", "discovery.k8s.io/v1") => {
            let s: EndpointSlice = serde_yaml::from_value(value).map_err(bad)?;
            objs.endpoint_slices.insert(key_of(&s.metadata), s);
        }
        ("Node", "v1") => {
            let n: Node = serde_yaml::from_value(value).map_err(bad)?;
            objs.nodes.insert(n.metadata.name.clone().unwrap_or_default(), n);
        }
        ("", _) => return Err("document has no `kind`".to_string()),
        ("Service" | "EndpointSlice" | "Node", _) => {
            return Err(format!("{kind} {name}: unsupported apiVersion {api:?}"));
        }
        _ => {} // not kxp's kind
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_multi_doc_and_lists() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: v1
kind: List
items:
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-abc, namespace: shop, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  endpoints: [{addresses: [10.244.1.2]}]
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: web}
---
"#;
        let mut objs = ClusterObjects::default();
        load_str(text, &mut objs).unwrap();
        assert_eq!(objs.services.len(), 1);
        assert_eq!(objs.endpoint_slices.len(), 1);
    }

    #[test]
    fn malformed_documents_are_named() {
        let mut objs = ClusterObjects::default();
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: ok}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {ports: 7}\n";
        let (doc, reason) = load_str(text, &mut objs).unwrap_err();
        assert_eq!(doc, 2);
        assert!(reason.contains("Service bad"), "{reason}");
        let (doc, reason) = load_str("a: [b\n", &mut objs).unwrap_err();
        assert_eq!(doc, 1);
        assert!(reason.contains("not valid YAML"), "{reason}");
        let (_, reason) = load_str("metadata: {name: x}\n", &mut objs).unwrap_err();
        assert!(reason.contains("no `kind`"));
    }
}
