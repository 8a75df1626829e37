//! `ferry plugin new NAME --lang rust|python|js`: writes a buildable plugin,
//! a complete engine for a simple format to start from (the same engine in
//! each language), with the contract (and for Rust the guest SDK) vendored,
//! and a sample shard the conformance kit runs on. Everything comes from
//! files embedded in this binary.

use std::path::Path;

use anyhow::{Context, bail};

use crate::plugin::types::check_engine_name;

const LIB_RS: &str = include_str!("../../templates/rust/lib.rs");
const README: &str = include_str!("../../templates/rust/README.md");
const APP_PY: &str = include_str!("../../templates/python/app.py");
const BUILD_PY: &str = include_str!("../../templates/python/build.sh");
const README_PY: &str = include_str!("../../templates/python/README.md");
const APP_JS: &str = include_str!("../../templates/js/app.js");
const BUILD_JS: &str = include_str!("../../templates/js/build.sh");
const README_JS: &str = include_str!("../../templates/js/README.md");
/// componentize-js and all it needs, pinned: the lock the project's own
/// JavaScript plugin builds with (its package name replaced).
const PACKAGE_LOCK_JS: &str = include_str!("../../../guests/redis-rdb-js/package-lock.json");
const PACKAGE_JSON_JS: &str = include_str!("../../../guests/redis-rdb-js/package.json");
const SDK_LIB_RS: &str = include_str!("../../../guests/sdk/src/lib.rs");
const CONTRACT: &str = include_str!("../../../wit/v0.2.0/engine.wit");
/// The wit-bindgen the project's own guests build with.
const WIT_BINDGEN: &str = "0.63.0";

/// The languages `ferry plugin new` writes plugins in.
pub const LANGS: [&str; 3] = ["rust", "python", "js"];

/// Writes the plugin `engine` in `lang` into `dir` (which must not exist).
pub fn write(engine: &str, lang: &str, dir: &Path) -> anyhow::Result<Vec<String>> {
    check_engine_name(engine).map_err(|e| anyhow::anyhow!("engine name {engine:?}: {e}"))?;
    if dir.exists() {
        bail!("{} exists already", dir.display());
    }
    let krate = engine.replace('-', "_");
    let fill = |text: &str| text.replace("{{ENGINE}}", engine).replace("{{CRATE}}", &krate);
    let mut files: Vec<(&str, String, bool)> = match lang {
        "rust" => rust(engine, &fill),
        "python" => vec![
            ("app.py", fill(APP_PY), false),
            ("build.sh", fill(BUILD_PY), true),
            ("README.md", fill(README_PY), false),
            (".gitignore", format!("/.venv/\n__pycache__/\n/{engine}.wasm\n"), false),
        ],
        "js" => vec![
            ("app.js", fill(APP_JS), false),
            ("build.sh", fill(BUILD_JS), true),
            ("README.md", fill(README_JS), false),
            ("package.json", package_json(engine), false),
            ("package-lock.json", package_lock(engine), false),
            (".gitignore", format!("/node_modules/\n/build/\n/{engine}.wasm\n"), false),
        ],
        other => bail!("--lang {other}: the templates are {}", LANGS.join(", ")),
    };
    files.extend([
        ("wit/v0.2.0/engine.wit", CONTRACT.to_owned(), false),
        ("sample/a.log", "first line\nsecond line\n".repeat(200), false),
        ("sample/b.log", "another file\n".repeat(300), false),
    ]);
    let mut written = Vec::new();
    for (path, contents, executable) in files {
        let full = dir.join(path);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&full, contents).with_context(|| format!("writing {}", full.display()))?;
        if executable {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&full, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("making {} executable", full.display()))?;
        }
        written.push(path.to_owned());
    }
    Ok(written)
}

/// The Rust crate: the engine, the SDK vendored (it finds the contract at
/// `../../wit/v0.2.0` from its crate).
fn rust(engine: &str, fill: &dyn Fn(&str) -> String) -> Vec<(&'static str, String, bool)> {
    vec![
        (
            "Cargo.toml",
            format!(
                "[package]\nname = \"{engine}\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n\
                 [dependencies]\nferry-plugin-sdk = {{ path = \"vendor/ferry-plugin-sdk\" }}\n\n\
                 [profile.release]\nopt-level = 3\nlto = true\ncodegen-units = 1\npanic = \"abort\"\nstrip = true\n\n\
                 # A crate of its own, not a member of an enclosing workspace.\n[workspace]\n"
            ),
            false,
        ),
        ("src/lib.rs", fill(LIB_RS), false),
        ("README.md", fill(README), false),
        (
            "vendor/ferry-plugin-sdk/Cargo.toml",
            format!(
                "[package]\nname = \"ferry-plugin-sdk\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n\
                 [dependencies]\nwit-bindgen = \"={WIT_BINDGEN}\"\n"
            ),
            false,
        ),
        ("vendor/ferry-plugin-sdk/src/lib.rs", SDK_LIB_RS.to_owned(), false),
    ]
}

/// The npm package's name (the engine's, marked as a Ferry plugin).
fn package_name(engine: &str) -> String {
    format!("{engine}-ferry-plugin")
}

/// The package.json the lock goes with: the project's own JavaScript
/// plugin's pins, under the new plugin's name.
fn package_json(engine: &str) -> String {
    let mut package = embedded_package();
    package["name"] = package_name(engine).into();
    package["description"] = format!("Ferry engine plugin for {engine}, in JavaScript (componentize-js)").into();
    serde_json::to_string_pretty(&package).expect("JSON serializes") + "\n"
}

fn embedded_package() -> serde_json::Value {
    serde_json::from_str(PACKAGE_JSON_JS).expect("the embedded package.json is JSON")
}

/// The embedded lock under the new plugin's package name (the lock names
/// its package as package.json does; every other byte stays).
fn package_lock(engine: &str) -> String {
    let original = embedded_package()["name"].as_str().expect("the embedded package.json has a name").to_owned();
    PACKAGE_LOCK_JS.replace(&format!("\"name\": \"{original}\""), &format!("\"name\": \"{}\"", package_name(engine)))
}
