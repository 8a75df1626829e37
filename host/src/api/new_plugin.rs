//! `ferry plugin new NAME --lang rust`: writes a buildable plugin crate, a
//! complete engine for a simple format to start from, with the guest SDK
//! and the contract vendored, and a sample shard the conformance kit runs
//! on. Everything comes from files embedded in this binary.

use std::path::Path;

use anyhow::{Context, bail};

use crate::plugin::types::check_engine_name;

const LIB_RS: &str = include_str!("../../templates/rust/lib.rs");
const README: &str = include_str!("../../templates/rust/README.md");
const SDK_LIB_RS: &str = include_str!("../../../guests/sdk/src/lib.rs");
const CONTRACT: &str = include_str!("../../../wit/v0.2.0/engine.wit");
/// The wit-bindgen the project's own guests build with.
const WIT_BINDGEN: &str = "0.63.0";

/// Writes the plugin `engine` into `dir` (which must not exist).
pub fn write(engine: &str, lang: &str, dir: &Path) -> anyhow::Result<Vec<String>> {
    check_engine_name(engine).map_err(|e| anyhow::anyhow!("engine name {engine:?}: {e}"))?;
    if lang != "rust" {
        bail!("--lang {lang}: only rust templates exist so far");
    }
    if dir.exists() {
        bail!("{} exists already", dir.display());
    }
    let krate = engine.replace('-', "_");
    let fill = |text: &str| text.replace("{{ENGINE}}", engine).replace("{{CRATE}}", &krate);
    let files = [
        (
            "Cargo.toml",
            format!(
                "[package]\nname = \"{engine}\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n\
                 [dependencies]\nferry-plugin-sdk = {{ path = \"vendor/ferry-plugin-sdk\" }}\n\n\
                 [profile.release]\nopt-level = 3\nlto = true\ncodegen-units = 1\npanic = \"abort\"\nstrip = true\n\n\
                 # A crate of its own, not a member of an enclosing workspace.\n[workspace]\n"
            ),
        ),
        ("src/lib.rs", fill(LIB_RS)),
        ("README.md", fill(README)),
        (
            "vendor/ferry-plugin-sdk/Cargo.toml",
            format!(
                "[package]\nname = \"ferry-plugin-sdk\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n\
                 [dependencies]\nwit-bindgen = \"={WIT_BINDGEN}\"\n"
            ),
        ),
        ("vendor/ferry-plugin-sdk/src/lib.rs", SDK_LIB_RS.to_owned()),
        // The SDK finds the contract at `../../wit/v0.2.0` from its crate.
        ("wit/v0.2.0/engine.wit", CONTRACT.to_owned()),
        ("sample/a.log", "first line\nsecond line\n".repeat(200)),
        ("sample/b.log", "another file\n".repeat(300)),
    ];
    let mut written = Vec::new();
    for (path, contents) in files {
        let full = dir.join(path);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&full, contents).with_context(|| format!("writing {}", full.display()))?;
        written.push(path.to_owned());
    }
    Ok(written)
}
