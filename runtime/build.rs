//! Compiles the XDP program with clang at build time (no prebuilt object is
//! kept in the repository).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/steer.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("steer.bpf.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        // Debian keeps asm/ headers under the multiarch directory.
        .args(["-I/usr/include/x86_64-linux-gnu", "-I/usr/include/aarch64-linux-gnu"])
        .args(["-c", src, "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("clang failed to compile {src} ({s}); run deploy/setup.sh for clang and libbpf-dev"),
        Err(e) => {
            panic!("cannot run {clang} to compile {src}: {e}; run deploy/setup.sh (installs clang, llvm, libbpf-dev)")
        }
    }
}
