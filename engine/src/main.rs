//! The `plasmavmc` binary: everything is in the library's `cli` module.

fn main() -> std::process::ExitCode {
    // Test builds only (feature `failpoints`): the fail points `FAILPOINTS` names, for the
    // life of the process. Agents are this binary too and set up their own.
    let _faults = plasmavmc::failpoint::setup();
    plasmavmc::cli::main()
}
