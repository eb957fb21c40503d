//! Disk images by URL in VM specs: the two forms, their checks located in the file, and
//! what the spec hash counts of them.

mod commits;

use commits::{errors, file};
use plasmavmc_specs::{load, Image};

const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

#[test]
fn a_disk_image_is_a_path_or_a_url_with_its_sha256() {
    let text = format!(
        "[[disks]]\nname = \"root\"\nimage = {{ url = \"https://example.org/d/debian.qcow2\", sha256 = \"{SHA}\" }}\n\n[[disks]]\nname = \"data\"\nimage = \"images/base.qcow2\"\n"
    );
    let d = load(&[file("vms/a.toml", &text)]).expect("valid");
    let disks = &d.vms["a"].spec.disks;
    let Some(Image::Url(url)) = &disks[0].image else {
        panic!("a URL image: {disks:?}");
    };
    assert_eq!(url.sha256, SHA);
    assert_eq!(url.file_name(), "debian.qcow2");
    assert_eq!(
        disks[1].image,
        Some(Image::Path("images/base.qcow2".to_owned()))
    );
}

#[test]
fn bad_urls_and_digests_are_refused_at_their_position() {
    let text = format!(
        "[[disks]]\nname = \"a\"\nimage = {{ url = \"ftp://example.org/x.qcow2\", sha256 = \"{SHA}\" }}\n\n[[disks]]\nname = \"b\"\nimage = {{ url = \"https://example.org/x\", sha256 = \"{}\" }}\n",
        SHA.to_uppercase()
    );
    let errs = errors(&[file("vms/a.toml", &text)]);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].starts_with("repo/vms/a.toml:3:11: url scheme \"ftp\" is not supported"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("repo/vms/a.toml:7:42: sha256 \"9F86"),
        "{errs:#?}"
    );
}

#[test]
fn unknown_or_missing_keys_of_a_url_image_are_named() {
    let errs = errors(&[file(
        "vms/a.toml",
        "[[disks]]\nname = \"a\"\nimage = { url = \"https://example.org/x\", sha = \"00\" }\n",
    )]);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].starts_with("repo/vms/a.toml:3:") && errs[0].contains("unknown field `sha`"),
        "{errs:#?}"
    );
    let errs = errors(&[file(
        "vms/a.toml",
        "[[disks]]\nname = \"a\"\nimage = { url = \"https://example.org/x\" }\n",
    )]);
    assert!(errs[0].contains("missing field `sha256`"), "{errs:#?}");
}

#[test]
fn a_url_image_is_the_same_disk_under_another_url_but_not_another_digest() {
    let spec = |url: &str, sha: &str| {
        let text = format!(
            "[[disks]]\nname = \"root\"\nimage = {{ url = \"{url}\", sha256 = \"{sha}\" }}\n"
        );
        load(&[file("vms/a.toml", &text)]).expect("valid").vms["a"]
            .hash
            .clone()
    };
    let first = spec("https://a.example/debian.qcow2", SHA);
    assert_eq!(first, spec("http://mirror.example/other-name", SHA));
    assert_ne!(
        first,
        spec("https://a.example/debian.qcow2", &SHA.replace('9', "8"))
    );
}
