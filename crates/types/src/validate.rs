//! Validation of user input. Every failure names the field it is about, so the
//! API can answer `invalid_argument` with a message a user can act on.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One invalid field: `field` is the request's field path (e.g.
/// `limits.memory_bytes`), `reason` says what is wrong in plain words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }

    pub fn required(field: impl Into<String>) -> Self {
        Self::new(field, "is required")
    }
}

/// Checks an RFC 1123 DNS label: 1-63 of `a-z`, `0-9` and `-`, neither first
/// nor last a `-`. Used for deployment and project names, which end up in
/// container names and hostnames.
pub fn dns_label(field: &str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(FieldError::required(field));
    }
    label_problem(value)
        .map_or(Ok(()), |why| Err(FieldError::new(field, format!("{value:?} is not a valid DNS label: {why}"))))
}

fn label_problem(label: &str) -> Option<&'static str> {
    if label.is_empty() {
        return Some("empty label");
    }
    if label.len() > 63 {
        return Some("longer than 63 characters");
    }
    if !label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Some("only lowercase letters, digits and '-' are allowed");
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Some("must not start or end with '-'");
    }
    None
}

/// A validated hostname in lowercase ASCII (internationalised names are turned
/// into punycode). Only a leading `*.` wildcard is allowed. The only way to
/// get one is [`Hostname::parse`], so anything holding a `Hostname` can put it
/// into a Traefik rule without escaping: no backtick, space, parenthesis or
/// operator can be in it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Hostname(String);

impl Hostname {
    pub const MAX_LEN: usize = 253;

    pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
        let bad = |why: &str| FieldError::new(field, format!("{value:?} is not a valid hostname: {why}"));
        if value.is_empty() {
            return Err(FieldError::required(field));
        }
        if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("whitespace and control characters are not allowed"));
        }
        // IDNA would silently drop invisible characters (zero-width spaces,
        // joiners): the name claimed must be the name typed.
        if value.chars().any(|c| !c.is_ascii() && !c.is_alphanumeric()) {
            return Err(bad("only letters, digits, '-' and '.' are allowed"));
        }
        let (wildcard, rest) = match value.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, value),
        };
        if rest.contains('*') {
            return Err(bad("a wildcard is only allowed as a leading '*.'"));
        }
        let rest = rest.strip_suffix('.').unwrap_or(rest);
        let ascii = if rest.is_ascii() {
            rest.to_ascii_lowercase()
        } else {
            idna::domain_to_ascii_strict(rest).map_err(|_| bad("not a valid internationalised domain name"))?
        };
        let total = ascii.len() + if wildcard { 2 } else { 0 };
        if total > Self::MAX_LEN {
            return Err(bad("longer than 253 characters"));
        }
        for label in ascii.split('.') {
            if let Some(why) = label_problem(label) {
                return Err(bad(why));
            }
        }
        if ascii.rsplit('.').next().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
            return Err(bad("an IP address is not a hostname"));
        }
        Ok(Self(if wildcard { format!("*.{ascii}") } else { ascii }))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Hostname {
    type Error = FieldError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse("hostname", &value)
    }
}

impl From<Hostname> for String {
    fn from(value: Hostname) -> Self {
        value.0
    }
}

/// A Docker image reference, checked against the grammar of
/// `distribution/reference`: `[host[:port]/]path[:tag][@digest]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageReference(String);

impl ImageReference {
    pub const MAX_NAME_LEN: usize = 255;

    pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
        if value.is_empty() {
            return Err(FieldError::required(field));
        }
        image_problem(value).map_or_else(
            || Ok(Self(value.to_owned())),
            |why| Err(FieldError::new(field, format!("{value:?} is not a valid image reference: {why}"))),
        )
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for ImageReference {
    type Error = FieldError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse("image", &value)
    }
}

impl From<ImageReference> for String {
    fn from(value: ImageReference) -> Self {
        value.0
    }
}

fn image_problem(reference: &str) -> Option<&'static str> {
    let (rest, digest) = match reference.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (reference, None),
    };
    if let Some(digest) = digest
        && let Some(why) = digest_problem(digest)
    {
        return Some(why);
    }
    // A tag follows the last ':' unless that ':' is part of a registry port
    // (then a '/' comes after it).
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if let Some(tag) = tag
        && let Some(why) = tag_problem(tag)
    {
        return Some(why);
    }
    if name.is_empty() {
        return Some("the repository name is empty");
    }
    if name.len() > ImageReference::MAX_NAME_LEN {
        return Some("the repository name is longer than 255 characters");
    }
    let mut components: Vec<&str> = name.split('/').collect();
    if components.len() > 1 && looks_like_registry(components[0]) {
        if let Some(why) = registry_problem(components[0]) {
            return Some(why);
        }
        components.remove(0);
    }
    components.into_iter().find_map(path_component_problem)
}

fn looks_like_registry(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost" || first.bytes().any(|b| b.is_ascii_uppercase())
}

fn registry_problem(registry: &str) -> Option<&'static str> {
    let (host, port) = match registry.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (registry, None),
    };
    if let Some(port) = port
        && (port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.parse::<u16>().is_err())
    {
        return Some("the registry port must be a number up to 65535");
    }
    let valid_host = !host.is_empty()
        && host.split('.').all(|part| {
            !part.is_empty()
                && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        });
    if valid_host { None } else { Some("the registry host is not a valid hostname") }
}

/// `alnum+ (separator alnum+)*` where a separator is `.`, `_`, `__` or `-+`.
fn path_component_problem(component: &str) -> Option<&'static str> {
    if component.is_empty() {
        return Some("a path component is empty");
    }
    if !component.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')) {
        return Some(
            "repository names may only contain lowercase letters, digits and the separators '.', '_', '__', '-'",
        );
    }
    let bytes = component.as_bytes();
    if !bytes[0].is_ascii_alphanumeric() || !bytes[bytes.len() - 1].is_ascii_alphanumeric() {
        return Some("a path component must start and end with a letter or digit");
    }
    let mut run: Vec<u8> = Vec::new();
    for &b in bytes {
        if b.is_ascii_alphanumeric() {
            if !run.is_empty() && !matches!(run.as_slice(), b"." | b"_" | b"__") && !run.iter().all(|&c| c == b'-') {
                return Some("invalid separator in repository name");
            }
            run.clear();
        } else {
            run.push(b);
        }
    }
    None
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`
fn tag_problem(tag: &str) -> Option<&'static str> {
    let bytes = tag.as_bytes();
    if bytes.is_empty() {
        return Some("the tag is empty");
    }
    if bytes.len() > 128 {
        return Some("the tag is longer than 128 characters");
    }
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    if !word(bytes[0]) || !bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-') {
        return Some("the tag may only contain letters, digits, '_', '.' and '-' and must not start with '.' or '-'");
    }
    None
}

/// `algorithm:hex` with a hex part of at least 32 digits.
fn digest_problem(digest: &str) -> Option<&'static str> {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return Some("the digest must look like sha256:<hex>");
    };
    let algorithm_ok = !algorithm.is_empty()
        && algorithm.as_bytes()[0].is_ascii_alphabetic()
        && algorithm.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'.' | b'-' | b'_'));
    if !algorithm_ok {
        return Some("the digest algorithm is invalid");
    }
    if hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Some("the digest must have at least 32 hexadecimal digits");
    }
    None
}

/// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`, at most 255 long.
pub fn env_var_name(field: &str, name: &str) -> Result<(), FieldError> {
    if name.is_empty() {
        return Err(FieldError::required(field));
    }
    let bytes = name.as_bytes();
    let ok = bytes.len() <= 255
        && (bytes[0].is_ascii_alphabetic() || bytes[0] == b'_')
        && bytes.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("{name:?} is not a valid variable name: use letters, digits and '_', not starting with a digit"),
        ))
    }
}

/// Checks an email address well enough to bind an invitation to it: one
/// `@`, a local part of visible ASCII without quotes, and a hostname.
/// Returns it lowercased (addresses are compared without case).
pub fn email(field: &str, value: &str) -> Result<String, FieldError> {
    if value.is_empty() {
        return Err(FieldError::required(field));
    }
    let invalid = |why: &str| FieldError::new(field, format!("{value:?} is not an email address: {why}"));
    if value.len() > 254 {
        return Err(invalid("longer than 254 characters"));
    }
    let Some((local, domain)) = value.split_once('@') else { return Err(invalid("no @")) };
    if local.is_empty() || local.len() > 64 {
        return Err(invalid("the part before @ must be 1-64 characters"));
    }
    if !local.bytes().all(|b| {
        b.is_ascii_graphic()
            && !matches!(b, b'"' | b'@' | b'(' | b')' | b',' | b';' | b'<' | b'>' | b'\\' | b'[' | b']')
    }) {
        return Err(invalid("the part before @ has a character addresses cannot have"));
    }
    let domain = domain.to_ascii_lowercase();
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 || labels.iter().any(|label| label_problem(label).is_some()) {
        return Err(invalid("the part after @ is not a hostname"));
    }
    Ok(format!("{}@{domain}", local.to_ascii_lowercase()))
}

/// A URL path prefix: starts with `/`, then segments of unreserved URL
/// characters; no empty, `.` or `..` segments.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PathPrefix(String);

impl PathPrefix {
    pub const MAX_LEN: usize = 256;

    pub fn root() -> Self {
        Self("/".to_owned())
    }

    pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
        let bad = |why: &str| FieldError::new(field, format!("{value:?} is not a valid path prefix: {why}"));
        if value.is_empty() || value == "/" {
            return Ok(Self::root());
        }
        if !value.starts_with('/') {
            return Err(bad("must start with '/'"));
        }
        if value.len() > Self::MAX_LEN {
            return Err(bad("longer than 256 characters"));
        }
        let trimmed = value.strip_suffix('/').unwrap_or(value);
        for segment in trimmed[1..].split('/') {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(bad("empty, '.' and '..' segments are not allowed"));
            }
            if !segment.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')) {
                return Err(bad("only letters, digits, '-', '.', '_' and '~' are allowed in a segment"));
            }
        }
        Ok(Self(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0 == "/"
    }
}

impl fmt::Display for PathPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for PathPrefix {
    type Error = FieldError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse("path_prefix", &value)
    }
}

impl From<PathPrefix> for String {
    fn from(value: PathPrefix) -> Self {
        value.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in ["a", "demo", "my-app-2", &"a".repeat(63)] {
            assert!(dns_label("name", ok).is_ok(), "{ok:?} refused");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "a b", "ü", &"a".repeat(64)] {
            let err = dns_label("name", bad).unwrap_err();
            assert_eq!(err.field, "name");
        }
        assert_eq!(dns_label("name", "").unwrap_err().reason, "is required");
    }

    #[test]
    fn hostnames_are_normalised() {
        assert_eq!(Hostname::parse("domain", "App.Example.COM").unwrap().as_str(), "app.example.com");
        assert_eq!(Hostname::parse("domain", "example.com.").unwrap().as_str(), "example.com");
        assert_eq!(Hostname::parse("domain", "bücher.example").unwrap().as_str(), "xn--bcher-kva.example");
        let wild = Hostname::parse("domain", "*.apps.example.com").unwrap();
        assert!(wild.is_wildcard());
        assert_eq!(Hostname::parse("domain", "localhost").unwrap().as_str(), "localhost");
    }

    #[test]
    fn hostile_hostnames_are_refused() {
        let hostile = [
            "",
            "a..b",
            "-a.com",
            "a-.com",
            "a.*.com",
            "**.a.com",
            "a.com`) || Host(`evil.com",
            "a.com && PathPrefix(`/`)",
            "a.com||b.com",
            "a.com)",
            "(a.com",
            "a com",
            "a.com\n",
            "a.com\r\nX: y",
            "a_b.com",
            "a.com/path",
            "a.com:80",
            "1.2.3.4",
            "\"a.com\"",
            "a.com\u{0}",
            "ex\u{200b}ample.com",
            "ex\u{ad}ample.com",
        ];
        for value in hostile {
            let err = Hostname::parse("domain", value).unwrap_err();
            assert_eq!(err.field, "domain", "{value:?}");
        }
        let long = format!("{}.com", vec!["a".repeat(63); 4].join("."));
        assert!(Hostname::parse("domain", &long).is_err());
    }

    #[test]
    fn image_references() {
        for ok in [
            "busybox",
            "flotilla/demo-http",
            "flotilla/demo-http:latest",
            "library/ubuntu:22.04",
            "registry.example.com:5000/team/app:v1.2.3",
            "localhost/app",
            "ghcr.io/a/b/c:tag_1",
            "a__b/c.d/e--f",
            "app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "app:1@sha256:0123456789abcdef0123456789abcdef",
        ] {
            assert!(ImageReference::parse("image", ok).is_ok(), "{ok:?} refused");
        }
        for bad in [
            "",
            "UPPER",
            "app:",
            ":tag",
            "app:-tag",
            "a b",
            "app:tag with space",
            "a//b",
            "a/-b",
            "a/b-",
            "a...b",
            "a@sha256:short",
            "a@sha256",
            "registry:99999/app",
            "app;rm -rf /",
            "app\n",
            "/app",
            &format!("a/{}", "b".repeat(260)),
        ] {
            let err = ImageReference::parse("image", bad).unwrap_err();
            assert_eq!(err.field, "image", "{bad:?}");
        }
    }

    #[test]
    fn env_var_names() {
        for ok in ["A", "_X", "DATABASE_URL", "a1"] {
            assert!(env_var_name("env[0].name", ok).is_ok());
        }
        for bad in ["", "1A", "A-B", "A B", "A=B"] {
            assert_eq!(env_var_name("env[0].name", bad).unwrap_err().field, "env[0].name");
        }
    }

    #[test]
    fn email_addresses() {
        assert_eq!(email("email", "Alice.Smith+x@Example.COM").as_deref(), Ok("alice.smith+x@example.com"));
        for bad in [
            "",
            "alice",
            "@example.com",
            "alice@",
            "alice@localhost",
            "a b@example.com",
            "alice@exa mple.com",
            "alice@@example.com",
            "\"alice\"@example.com",
            "alice@-example.com",
            "alice@example..com",
            "al\nice@example.com",
        ] {
            let error = email("email", bad).expect_err(bad);
            assert_eq!(error.field, "email", "{bad}");
        }
        assert!(email("email", &format!("{}@example.com", "a".repeat(65))).is_err());
    }

    #[test]
    fn hostile_path_prefixes_are_refused() {
        for bad in
            ["api", "/a b", "/a`)", "/a||b", "/a&&b", "/(a)", "/a//b", "/../x", "/a\n", "/a?x=1", "/a#f", "/%2e%2e"]
        {
            assert!(PathPrefix::parse("path_prefix", bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(PathPrefix::parse("p", "").unwrap().as_str(), "/");
        assert_eq!(PathPrefix::parse("p", "/a/b/").unwrap().as_str(), "/a/b");
    }
}
