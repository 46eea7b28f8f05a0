//! The `keybroker` command: see `keybroker --help`.
fn main() -> std::process::ExitCode {
    keybroker::cli::main()
}
