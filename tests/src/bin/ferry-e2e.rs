//! The `ferry` binary, built as part of this package so that
//! `cargo test -p ferry-tests` always runs the current code: same entry point
//! as `host/src/main.rs`.

fn main() -> std::process::ExitCode {
    ferry::api::cli::main()
}
