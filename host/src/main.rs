fn main() -> std::process::ExitCode {
    ferry::api::cli::main()
}
