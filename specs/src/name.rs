//! Names of VMs, hosts, disks and groups: `^[a-z][a-z0-9-]{0,62}$`.
//!
//! A name becomes a folder and a QEMU argument, so nothing else is allowed: no `/`,
//! no `..`, no spaces, no unicode look-alikes, no commas.

/// Longest allowed name, in bytes (a DNS label).
pub const MAX_NAME_LEN: usize = 63;

/// Why `name` is not a valid name, or `None` when it is.
pub fn name_problem(name: &str) -> Option<String> {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return Some("name is empty".to_owned());
    };
    if name.len() > MAX_NAME_LEN {
        return Some(format!(
            "name is {} bytes long; at most {MAX_NAME_LEN} allowed",
            name.len()
        ));
    }
    if !first.is_ascii_lowercase() {
        return Some(format!(
            "name {name:?} must start with a lowercase letter a-z"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Some(format!(
            "name {name:?} contains {bad:?}; only lowercase letters a-z, digits and '-' are allowed"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::name_problem;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "web-1", "db0", &"a".repeat(63)] {
            assert_eq!(name_problem(ok), None, "{ok}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "1a",
            "-a",
            "A",
            "a/b",
            "..",
            "a b",
            "a.b",
            "a,b",
            "а",
            "a_b",
            &"a".repeat(64),
        ] {
            assert!(name_problem(bad).is_some(), "{bad:?} accepted");
        }
    }
}
