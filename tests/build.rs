//! Builds the guest plugins (through `guests/build.sh`) and exposes their
//! paths as constants, so `cargo test` always runs against guests built from
//! the sources in this checkout. Never against committed binaries.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_owned();
    println!("cargo:rerun-if-changed={}", root.join("guests").display());
    println!("cargo:rerun-if-changed={}", root.join("wit").display());

    // The guest build is a separate cargo, with another toolchain: give it a
    // clean environment, not the one this build script runs in.
    let mut cmd = Command::new(root.join("guests/build.sh"));
    cmd.env_clear();
    for var in ["PATH", "HOME", "CARGO_HOME", "RUSTUP_HOME", "FERRY_TOOLS_DIR", "TMPDIR"] {
        if let Some(value) = std::env::var_os(var) {
            cmd.env(var, value);
        }
    }
    let status = cmd.status().expect("running guests/build.sh");
    if !status.success() {
        panic!("building the guest plugins failed (run tests/setup.sh once to install the guest toolchain)");
    }

    let plugins = root.join("target/plugins");
    let mut consts = String::new();
    let mut names: Vec<String> = std::fs::read_dir(&plugins)
        .expect("target/plugins")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".wasm"))
        .collect();
    names.sort();
    for name in names {
        let ident = name.trim_end_matches(".wasm").replace('-', "_").to_uppercase();
        consts.push_str(&format!(
            "/// The `{name}` guest, built from `guests/`.\npub const {ident}: &str = {:?};\n",
            plugins.join(&name).display().to_string()
        ));
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("plugins.rs");
    std::fs::write(out, consts).unwrap();
}
