//! Fuzzes the spec loader with whole commits: the input's parts (split on 0xFF) are
//! `vms/web.toml`, `hosts/hv1.toml`, `plasmavmc.toml`, then (path, bytes) pairs. The
//! invariants (no panic, every diagnostic inside the file it names, accepted specs
//! round-trip through TOML) are checked by `plasmavmc_specs::fuzz::check_bytes`, the
//! same function the stable smoke test `specs/tests/fuzz_smoke.rs` runs.
//!
//! `cargo +nightly fuzz run specs -- -dict=specs.dict` from `fuzz/` (see the README).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    plasmavmc_specs::fuzz::check_bytes(data);
});
