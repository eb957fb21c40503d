//! Validation of whole commits: every error, located, and nothing half-read.

mod commits;

use commits::{errors, file};
use plasmavmc_specs::{load, SourceFile};

#[test]
fn a_valid_commit_loads_with_defaults_and_names_from_files() {
    let d = load(&[
        file("vms/web/a.toml", "memory_mb = 128\n"),
        file("vms/b.toml", "name = \"bee\"\npower = \"stopped\"\n"),
        file("README.md", "not a spec"),
    ])
    .expect("valid");
    assert!(d.implicit_local);
    assert_eq!(d.hosts.keys().collect::<Vec<_>>(), ["local"]);
    assert_eq!(d.vms.keys().collect::<Vec<_>>(), ["a", "bee"]);
    assert_eq!(d.vms["a"].spec.vcpus, 1);
    assert_eq!(d.vms["a"].file, "repo/vms/web/a.toml");
    assert_eq!(d.vms["a"].hash.len(), 16);
}

#[test]
fn every_error_of_every_file_is_reported_with_its_position() {
    let errs = errors(&[
        file("vms/a.toml", "vcpus = 1\nmemroy_mb = 64\n"),
        file("vms/b.toml", "vcpus = \"two\"\n"),
        file("vms/c.toml", "memory_mb = 0\n"),
        file("vms/Bad_Name.toml", "vcpus = 1\n"),
        file("vms/d.toml", "host = \"hv9\"\n"),
        file("vms/ok.toml", "vcpus = 2\n"),
    ]);
    assert_eq!(errs.len(), 5, "{errs:#?}");
    assert!(
        errs[0].starts_with("repo/vms/Bad_Name.toml:1:1: file name gives the name \"Bad_Name\""),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("repo/vms/a.toml:2:1: unknown field `memroy_mb`"),
        "{errs:#?}"
    );
    assert!(
        errs[2].starts_with("repo/vms/b.toml:1:9: invalid type"),
        "{errs:#?}"
    );
    assert_eq!(
        errs[3],
        "repo/vms/c.toml:1:1: memory_mb = 0 must be at least 16"
    );
    assert!(
        errs[4].starts_with("repo/vms/d.toml:1:1: unknown host \"hv9\""),
        "{errs:#?}"
    );
}

#[test]
fn duplicate_names_name_both_files() {
    let errs = errors(&[
        file("vms/x/a.toml", ""),
        file("vms/y/a.toml", ""),
        file("vms/z.toml", "name = \"a\""),
    ]);
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(
        errs[0].contains(
            "repo/vms/x/a.toml: VM name \"a\" is also used by repo/vms/y/a.toml, repo/vms/z.toml"
        ),
        "{errs:#?}"
    );
}

#[test]
fn disk_and_nic_problems_point_into_arrays() {
    let text = "[[disks]]\nname = \"root\"\nsize_gb = 1\n\n[[disks]]\nname = \"root\"\nimage = \"x\"\nsize_gb = 2\n\n[[nics]]\nforward = [\"tcp:22\"]\n";
    let errs = errors(&[file("vms/a.toml", text)]);
    assert_eq!(
        errs[..3],
        [
            "repo/vms/a.toml:6:1: disk name \"root\" is used twice in this VM",
            "repo/vms/a.toml:7:1: set either `size_gb` or `image`, not both",
            "repo/vms/a.toml:11:12: forward \"tcp:22\" must look like \"tcp:2222:22\"",
        ]
    );
}

#[test]
fn binary_garbage_and_huge_files_are_refused_by_path() {
    let mut huge = "# x\n".repeat(300_000);
    huge.push_str("vcpus = 1\n");
    let errs = errors(&[
        SourceFile {
            path: "repo/vms/bin.toml".into(),
            rel: "vms/bin.toml".into(),
            bytes: vec![b'a', b'=', 0xff, 0xfe],
        },
        file("vms/huge.toml", &huge),
    ]);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(errs[0].contains("not valid UTF-8"), "{errs:#?}");
    assert!(errs[1].contains("limited to"), "{errs:#?}");
}

#[test]
fn hosts_replace_the_implicit_local_host() {
    let d = load(&[
        file(
            "hosts/hv1.toml",
            "address = \"ssh://root@hv1\"\nroot = \"/var/lib/plasmavmc\"\n",
        ),
        file("vms/a.toml", "host = \"hv1\"\n"),
    ])
    .expect("valid");
    assert!(!d.implicit_local);
    assert_eq!(d.hosts.keys().collect::<Vec<_>>(), ["hv1"]);
    let errs = errors(&[file(
        "hosts/hv2.toml",
        "address = \"ssh://-oProxyCommand=x\"\n",
    )]);
    assert!(errs[0].contains("not a valid ssh://"), "{errs:#?}");
}

#[test]
fn durations_in_cluster_settings_are_checked() {
    let errs = errors(&[file("plasmavmc.toml", "[timeouts]\nstop = \"soon\"\n")]);
    assert!(
        errs[0].starts_with("repo/plasmavmc.toml:2:8: invalid duration \"soon\""),
        "{errs:#?}"
    );
    let d = load(&[file("plasmavmc.toml", "[timeouts]\nstop = \"5s\"\n")]).expect("valid");
    assert_eq!(d.cluster.timeouts.stop.0.as_secs(), 5);
}

#[test]
fn durations_beyond_a_year_are_refused_not_overflowed() {
    // Found by the fuzz check: `interval * 2` overflowed and the validator panicked.
    let errs = errors(&[file(
        "plasmavmc.toml",
        "[heartbeat]\ninterval = \"18446744073709551615s\"\n\n[timeouts]\nqmp_ready = \"500000000years\"\n",
    )]);
    assert_eq!(
        errs,
        ["repo/plasmavmc.toml:2:12: duration \"18446744073709551615s\" is longer than a year",],
        "{errs:#?}"
    );
    let d = load(&[file(
        "plasmavmc.toml",
        "[restart]\nbackoff_max = \"1y\"\nwindow = \"365d\"\n",
    )])
    .expect("a year is allowed");
    assert_eq!(d.cluster.restart.window.0.as_secs(), 365 * 24 * 3600);
}

#[test]
fn ssh_files_are_for_ssh_hosts_only() {
    let d = load(&[file(
        "hosts/hv1.toml",
        "address = \"ssh://root@hv1:2222\"\nknown_hosts = \"keys/known_hosts\"\nidentity_file = \"/etc/plasmavmc/id\"\n",
    )])
    .expect("valid");
    let hv1 = &d.hosts["hv1"].spec;
    assert_eq!(hv1.known_hosts.as_deref(), Some("keys/known_hosts"));
    assert_eq!(hv1.identity_file.as_deref(), Some("/etc/plasmavmc/id"));
    let errs = errors(&[
        file("hosts/a.toml", "address = \"local\"\nknown_hosts = \"k\"\n"),
        file(
            "hosts/b.toml",
            "exec = [\"/bin/agent\"]\n\nidentity_file = \"id\"\n",
        ),
        file(
            "hosts/c.toml",
            "address = \"ssh://c\"\nidentity_file = \"\"\n",
        ),
        file(
            "hosts/d.toml",
            "address = \"ssh://d\"\nidentity_fil = \"id\"\n",
        ),
    ]);
    assert_eq!(
        errs[..3],
        [
            "repo/hosts/a.toml:2:1: known_hosts is only used with an ssh:// address, but this host is reached by address = \"local\"",
            "repo/hosts/b.toml:3:1: identity_file is only used with an ssh:// address, but this host is reached by `exec` (put ssh options in its argv)",
            "repo/hosts/c.toml:2:1: path is empty",
        ],
        "{errs:#?}"
    );
    assert!(
        errs[3].starts_with("repo/hosts/d.toml:2:1: unknown field `identity_fil`"),
        "{errs:#?}"
    );
}

#[test]
fn priority_defaults_to_zero_is_bounded_and_leaves_old_hashes_alone() {
    let d = load(&[
        file("vms/a.toml", ""),
        file("vms/b.toml", "priority = 1000\n"),
        file("vms/c.toml", "priority = -1000\n"),
    ])
    .expect("valid");
    assert_eq!(
        ["a", "b", "c"].map(|v| d.vms[v].spec.priority),
        [0, 1000, -1000]
    );
    // The default is not part of the normalised spec: VMs committed before `priority`
    // existed keep their hash.
    let json = serde_json::to_value(&d.vms["a"].spec).expect("serialises");
    assert!(json.get("priority").is_none(), "{json}");
    assert!(serde_json::to_value(&d.vms["b"].spec)
        .expect("serialises")
        .get("priority")
        .is_some());
    let errs = errors(&[
        file("vms/high.toml", "vcpus = 1\npriority = 1001\n"),
        file("vms/huge.toml", "priority = 3000000000\n"),
    ]);
    assert_eq!(
        errs[0],
        "repo/vms/high.toml:2:1: priority = 1001 must be between -1000 and 1000"
    );
    assert!(
        errs[1].starts_with("repo/vms/huge.toml:1:12: invalid value"),
        "{errs:#?}"
    );
}

#[test]
fn runas_and_chroot_are_checked() {
    let d = load(&[file(
        "vms/a.toml",
        "[qemu]\nrunas = \"qemu-vm\"\nchroot = \"/var/lib/plasmavmc/empty\"\n",
    )])
    .expect("valid");
    assert_eq!(d.vms["a"].spec.qemu.runas.as_deref(), Some("qemu-vm"));
    let errs = errors(&[file(
        "vms/b.toml",
        "[qemu]\nrunas = \"Root;x\"\nchroot = \"../jail\"\n",
    )]);
    assert_eq!(
        errs,
        [
            "repo/vms/b.toml:2:1: runas \"Root;x\" is not a user name (lowercase letters, digits, '_', '-')",
            "repo/vms/b.toml:3:1: chroot \"../jail\" must be an absolute path without '..' or ','",
        ],
        "{errs:#?}"
    );
}

#[test]
fn postcopy_is_off_unless_asked_and_its_delay_is_checked() {
    let d = load(&[file(
        "plasmavmc.toml",
        "[migration]\nauto_converge = true\n",
    )])
    .expect("valid");
    assert_eq!(d.cluster.migration.postcopy_after, None);
    let d = load(&[file(
        "plasmavmc.toml",
        "[migration]\npostcopy_after = \"60s\"\n",
    )])
    .expect("valid");
    assert_eq!(
        d.cluster.migration.postcopy_after.map(|p| p.0.as_secs()),
        Some(60)
    );
    let errs = errors(&[file(
        "plasmavmc.toml",
        "[migration]\npostcopy_after = \"10ms\"\n",
    )]);
    assert_eq!(
        errs,
        ["repo/plasmavmc.toml:2:1: postcopy_after must be at least 100ms"],
        "{errs:#?}"
    );
}
