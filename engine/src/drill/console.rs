//! What the test guest (`tests/guest/init.sh`) prints on its serial console, read back:
//! `disk: boots=N` once at boot when it has a data disk (the count it keeps there),
//! then `tick N` every 0.2 s while it runs.
//!
//! In: a console's text. Out: numbers. The drill reads its sandbox's consoles with
//! these, and so do the end-to-end tests (`tests/harness/serial.rs`).

/// The numbers of the `tick N` lines, in order.
pub fn ticks(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tick ")?.parse().ok())
        .collect()
}

/// The number of the last `tick N` line.
pub fn last_tick(console: &str) -> Option<u64> {
    ticks(console).last().copied()
}

/// The boot count the guest printed (`disk: boots=N`), the last if it booted twice.
pub fn boot_count(console: &str) -> Option<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("disk: boots="))
        .filter_map(|n| n.trim().parse().ok())
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_read_in_order() {
        let log = "boot\ntick 1\n tick 2 \ntick x\ndisk: boots=1\ntick 3\n";
        assert_eq!(ticks(log), vec![1, 2, 3]);
        assert_eq!(last_tick(log), Some(3));
        assert_eq!(last_tick("no ticks"), None);
    }

    #[test]
    fn the_last_boot_count_is_the_guests() {
        assert_eq!(
            boot_count("disk: boots=2\ntick 1\n disk: boots=3 \ntick 2\n"),
            Some(3)
        );
        assert_eq!(boot_count("tick 1\n"), None);
    }
}
