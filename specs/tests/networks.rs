//! Networks, MACs and CPU models across a commit: every problem located as
//! `path:line:col`, naming what is declared or who else holds a MAC.

mod commits;

use commits::{errors, file};
use plasmavmc_specs::{derived_mac, load};

const CLUSTER: &str =
    "[networks.lan]\nbridge = \"br-lan\"\n\n[networks.dmz]\nbridge = \"br-dmz\"\nvlan = 20\n";

#[test]
fn declared_networks_hosts_and_nics_load() {
    let d = load(&[
        file("plasmavmc.toml", CLUSTER),
        file("hosts/hv1.toml", "address = \"local\"\nnetworks = [\"lan\", \"dmz\"]\n"),
        file(
            "vms/web.toml",
            "[[nics]]\nnetwork = \"lan\"\nmac = \"52:54:00:12:ab:cd\"\n\n[[nics]]\nforward = [\"tcp:2222:22\"]\n\n[qemu]\ncpu = \"x86-64-v2\"\n",
        ),
    ])
    .expect("valid");
    assert_eq!(d.cluster.networks["dmz"].vlan, Some(20));
    assert_eq!(d.hosts["hv1"].spec.networks, ["lan", "dmz"]);
    assert_eq!(d.vms["web"].spec.nics[0].network.as_str(), "lan");
    assert!(d.vms["web"].spec.nics[1].network.is_user());
}

#[test]
fn a_nic_or_host_on_an_undeclared_network_names_the_declared_ones() {
    let errs = errors(&[
        file("plasmavmc.toml", CLUSTER),
        file(
            "hosts/hv1.toml",
            "address = \"local\"\nnetworks = [\"lan\", \"wan\"]\n",
        ),
        file("vms/web.toml", "[[nics]]\nnetwork = \"lna\"\n"),
    ]);
    assert_eq!(
        errs,
        [
            "repo/hosts/hv1.toml:2:20: unknown network \"wan\"; declared networks: dmz, lan",
            "repo/vms/web.toml:2:1: unknown network \"lna\"; \"user\" or a declared one: declared networks: dmz, lan",
        ]
    );
    let none = errors(&[file("vms/web.toml", "[[nics]]\nnetwork = \"lan\"\n")]);
    assert!(
        none[0].contains("no networks are declared (add [networks.NAME]"),
        "{none:?}"
    );
}

#[test]
fn forwards_are_for_user_nics_only() {
    let errs = errors(&[
        file("plasmavmc.toml", CLUSTER),
        file(
            "vms/web.toml",
            "[[nics]]\nnetwork = \"lan\"\nforward = [\"tcp:2222:22\"]\n",
        ),
    ]);
    assert_eq!(
        errs,
        ["repo/vms/web.toml:3:1: forward is only for network = \"user\" NICs; a NIC on \"lan\" is reached through its bridge"]
    );
}

#[test]
fn bad_macs_are_refused_where_they_are_written() {
    let errs = errors(&[file(
        "vms/web.toml",
        "[[nics]]\nmac = \"01:00:5e:00:00:01\"\n\n[[nics]]\nmac = \"00:00:00:00:00:00\"\n\n[[nics]]\nmac = \"52:54:00:12:ab\"\n",
    )]);
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(
        errs[0].starts_with("repo/vms/web.toml:2:1: mac \"01:00:5e:00:00:01\" is a multicast"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("repo/vms/web.toml:5:1: mac \"00:00:00:00:00:00\" is all zeros"),
        "{errs:#?}"
    );
    assert!(
        errs[2].starts_with("repo/vms/web.toml:8:1: mac \"52:54:00:12:ab\" must be six hex octets"),
        "{errs:#?}"
    );
}

#[test]
fn two_nics_with_one_mac_are_refused_at_the_second_naming_the_first() {
    let mut files = vec![
        file("vms/a.toml", "[[nics]]\nmac = \"52:54:00:12:AB:CD\"\n"),
        file(
            "vms/b.toml",
            "vcpus = 1\n\n[[nics]]\n\n[[nics]]\nmac = \"52:54:00:12:ab:cd\"\n",
        ),
    ];
    let errs = errors(&files);
    files.reverse();
    assert_eq!(errors(&files), errs, "the same whatever the files' order");
    assert_eq!(
        errs,
        ["repo/vms/b.toml:6:1: mac 52:54:00:12:ab:cd is already used by nics[0] of VM \"a\"; MACs must be unique in the repository"]
    );
    // A given MAC that equals another NIC's derived one: reported at the NIC without one.
    let taken = derived_mac("b", 0);
    let errs = errors(&[
        file("vms/a.toml", &format!("[[nics]]\nmac = \"{taken}\"\n")),
        file("vms/b.toml", "vcpus = 1\n\n[[nics]]\n"),
    ]);
    assert_eq!(
        errs,
        [format!("repo/vms/b.toml:3:1: mac {taken} (derived) is already used by nics[0] of VM \"a\"; MACs must be unique in the repository")]
    );
}

#[test]
fn derived_macs_differ_per_vm_and_nic() {
    let d = load(&[
        file("vms/a.toml", "[[nics]]\n\n[[nics]]\n"),
        file("vms/b.toml", "[[nics]]\n"),
    ])
    .expect("derived MACs do not clash");
    let a = &d.vms["a"].spec.nics;
    let macs = [
        a[0].mac_of("a", 0),
        a[1].mac_of("a", 1),
        derived_mac("b", 0),
    ];
    assert!(macs[0] != macs[1] && macs[0] != macs[2] && macs[1] != macs[2]);
    assert_eq!(macs[0], derived_mac("a", 0), "stable");
}

#[test]
fn networks_need_a_linux_bridge_name_and_a_vlan_in_range() {
    let errs = errors(&[file(
        "plasmavmc.toml",
        "[networks.lan]\nbridge = \"br-lan-far-too-long\"\n\n[networks.dmz]\nbridge = \"br dmz\"\nvlan = 4095\n\n[networks.user]\nbridge = \"br0\"\n\n[networks.Bad]\nbridge = \"br1\"\nvlan = 0\n",
    )]);
    assert_eq!(errs.len(), 6, "{errs:#?}");
    let expect = [
        "repo/plasmavmc.toml:2:1: bridge \"br-lan-far-too-long\" must be 1 to 15 characters",
        "repo/plasmavmc.toml:5:1: bridge \"br dmz\" contains ' '",
        "repo/plasmavmc.toml:6:1: vlan = 4095 must be between 1 and 4094",
        "repo/plasmavmc.toml:8:11: \"user\" is QEMU's user-mode network",
        "repo/plasmavmc.toml:11:11: network name \"Bad\" must start with a lowercase letter",
        "repo/plasmavmc.toml:13:1: vlan = 0 must be between 1 and 4094",
    ];
    for (err, want) in errs.iter().zip(expect) {
        assert!(err.starts_with(want), "{err:?} should start with {want:?}");
    }
}

#[test]
fn cpu_models_are_checked() {
    let errs = errors(&[
        file("vms/a.toml", "[qemu]\ncpu = \"host,+vmx\"\n"),
        file("vms/b.toml", "[qemu]\ncpu = \"host\"\n"),
        file("vms/c.toml", "[qemu]\ncpu = \"Skylake-Server-v4\"\n"),
    ]);
    assert_eq!(
        errs,
        ["repo/vms/a.toml:2:1: cpu \"host,+vmx\" is not a QEMU CPU model name (letters, digits, '.', '_', '-'; or \"host\")"]
    );
}
