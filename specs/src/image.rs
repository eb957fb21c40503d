//! A disk's base image: a file on the controller (`image = "images/base.qcow2"`), or a
//! file each host downloads (`image = { url = "https://…/x.qcow2", sha256 = "…" }`).
//!
//! Types and their checks only; nothing here reads a file or opens a connection. A URL
//! image is identified by its SHA-256: two specs naming the same digest under different
//! URLs name the same image (see [`Image::identity`]).

use std::fmt;

use schemars::JsonSchema;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

/// The base image a disk is created from, as a copy-on-write qcow2 overlay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Image {
    /// A file read from the controller's filesystem, like `boot.kernel`: absolute, or
    /// relative to the spec folder; copied to each host that needs it.
    Path(String),
    /// A file each host downloads once and checks against its SHA-256.
    Url(UrlImage),
}

/// An image by URL: each host downloads it once into its file store, and uses it only
/// once its SHA-256 matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UrlImage {
    /// Where to download it: an `http://` or `https://` URL without credentials. The
    /// checksum, not the transport, vouches for the content.
    pub url: String,
    /// SHA-256 of the file, 64 lowercase hex digits (as `sha256sum` prints it). This is
    /// the image's identity: changing only the URL does not change the disk.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: String,
}

impl Image {
    /// What the spec hash counts of this image: the path, or only the SHA-256 of a URL
    /// image (a mirror with the same file is the same image).
    pub fn identity(&self) -> Image {
        match self {
            Image::Path(p) => Image::Path(p.clone()),
            Image::Url(u) => Image::Url(UrlImage {
                url: String::new(),
                sha256: u.sha256.clone(),
            }),
        }
    }

    /// Everything wrong with this image on its own: `(key below "image", message)`;
    /// the key is empty for the path form.
    pub fn problems(&self) -> Vec<(Option<&'static str>, String)> {
        match self {
            Image::Path(p) => crate::vm::path_problem(p)
                .map(|m| (None, m))
                .into_iter()
                .collect(),
            Image::Url(u) => {
                let mut out = Vec::new();
                if let Some(m) = url_problem(&u.url) {
                    out.push((Some("url"), m));
                }
                if let Some(m) = sha256_problem(&u.sha256) {
                    out.push((Some("sha256"), m));
                }
                out
            }
        }
    }
}

impl UrlImage {
    /// The URL's last path segment (`debian-12.qcow2`), for progress lines; the host
    /// part when the path has none.
    pub fn file_name(&self) -> &str {
        let rest = self
            .url
            .split_once("://")
            .map_or(self.url.as_str(), |(_, r)| r);
        let path = rest.split(['?', '#']).next().unwrap_or(rest);
        path.rsplit('/').find(|s| !s.is_empty()).unwrap_or(path)
    }
}

/// Why `url` cannot be downloaded from, or `None`.
pub fn url_problem(url: &str) -> Option<String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Some(format!(
            "url {url:?} must start with \"https://\" or \"http://\""
        ));
    };
    if scheme != "https" && scheme != "http" {
        return Some(format!(
            "url scheme {scheme:?} is not supported: use \"https\" or \"http\" (the sha256 checks the content either way)"
        ));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some(format!(
            "url {url:?} contains a blank or a control character"
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Some(
            "url holds credentials (user@ or user:password@): they would be committed to git and logged; serve the image without them"
                .to_owned(),
        );
    }
    // `[::1]:8443`, `host:8000`, `host`: the host is what comes before the port.
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    };
    if host.is_empty() || authority.ends_with(':') {
        return Some(format!("url {url:?} names no host"));
    }
    None
}

/// Why `sha256` is not a SHA-256 in lowercase hex, or `None`.
pub fn sha256_problem(sha256: &str) -> Option<String> {
    let ok = sha256.len() == 64
        && sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (!ok).then(|| {
        format!(
            "sha256 {sha256:?} must be 64 lowercase hex digits (the first word `sha256sum FILE` prints)"
        )
    })
}

/// A string is a path; a table is `{ url, sha256 }`, with serde's own words for unknown
/// or missing keys (an untagged enum would only say that nothing matched).
impl<'de> Deserialize<'de> for Image {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ImageVisitor;
        impl<'de> Visitor<'de> for ImageVisitor {
            type Value = Image;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a path, or a table { url = \"https://…\", sha256 = \"…\" }")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Image, E> {
                Ok(Image::Path(v.to_owned()))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Image, A::Error> {
                UrlImage::deserialize(de::value::MapAccessDeserializer::new(map)).map(Image::Url)
            }
        }
        deserializer.deserialize_any(ImageVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn urls_are_http_or_https_with_a_host_and_no_credentials() {
        for good in [
            "https://cloud.debian.org/images/debian-12-genericcloud-amd64.qcow2",
            "http://127.0.0.1:8000/x.qcow2",
            "https://[::1]:8443/x",
        ] {
            assert_eq!(url_problem(good), None, "{good}");
        }
        for (bad, says) in [
            ("ftp://example.org/x.qcow2", "not supported"),
            ("file:///srv/x.qcow2", "not supported"),
            ("example.org/x.qcow2", "must start with"),
            ("https:///x.qcow2", "names no host"),
            ("https://example.org:/x", "names no host"),
            ("https://me:pw@example.org/x", "credentials"),
            ("https://example.org/a b", "blank"),
        ] {
            let p = url_problem(bad).unwrap_or_default();
            assert!(p.contains(says), "{bad}: {p}");
        }
    }

    #[test]
    fn a_sha256_is_64_lowercase_hex_digits() {
        assert_eq!(sha256_problem(SHA), None);
        assert!(sha256_problem(&SHA.to_uppercase()).is_some());
        assert!(sha256_problem(&SHA[1..]).is_some());
        assert!(sha256_problem(&format!("{}g", &SHA[1..])).is_some());
    }

    #[test]
    fn a_url_image_is_known_by_its_digest_and_its_file_name() {
        let a = UrlImage {
            url: "https://a.example/imgs/debian.qcow2?x=1".to_owned(),
            sha256: SHA.to_owned(),
        };
        let b = UrlImage {
            url: "http://mirror.example/debian.qcow2".to_owned(),
            ..a.clone()
        };
        assert_eq!(a.file_name(), "debian.qcow2");
        assert_eq!(Image::Url(a).identity(), Image::Url(b).identity());
    }
}
