//! The `plasmavmc` binary: everything is in the library's `cli` module.

fn main() -> std::process::ExitCode {
    plasmavmc::cli::main()
}
