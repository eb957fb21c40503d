//! Errors as one line: what every module that reports an error to a log, a status file
//! or the agent protocol needs. Ground floor: imports nothing of the crate.

/// `error: cause: cause`, the whole `source()` chain on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
