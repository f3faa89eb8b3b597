//! What every benchmark that builds a lab does first: find the kxp binary,
//! and make sure the lab's namespaces go away however the run ends.

use std::path::PathBuf;

/// The kxp binary (`--kxp`, else next to this one). Installs a Ctrl-C
/// handler that deletes every namespace named `prefix*` (their links go
/// with them; children get the same SIGINT from the terminal), and deletes
/// the leftovers of a killed run now.
pub fn prepare(prefix: &'static str, kxp: Option<PathBuf>) -> Result<PathBuf, String> {
    let bin = kxp
        .or_else(|| lab::kxp::sibling_binary("kxp"))
        .ok_or("cannot find the kxp binary next to bench; build the workspace (cargo build --release) or pass --kxp")?;
    ctrlc::set_handler(move || {
        lab::remove_namespaces_with_prefix(prefix);
        std::process::exit(130);
    })
    .map_err(|e| e.to_string())?;
    lab::remove_namespaces_with_prefix(prefix);
    Ok(bin)
}
