//! Custom domains: which domains need proving, and the DNS TXT record that
//! proves one. A domain under one of the operator's platform domains is the
//! operator's own (its wildcard DNS points at the edge); any other domain is
//! routed only once its owner has published the token Flotilla gave for
//! that deployment and domain.

use crate::Hostname;

/// The label in front of the domain where the token is published.
pub const VERIFICATION_LABEL: &str = "_flotilla-challenge";

/// What the TXT record's value starts with.
pub const VERIFICATION_PREFIX: &str = "flotilla-verification=";

/// Whether `domain` is one of `platform` or under one of them.
pub fn is_platform_domain(platform: &[Hostname], domain: &str) -> bool {
    let domain = domain.strip_prefix("*.").unwrap_or(domain);
    platform.iter().any(|base| {
        let base = base.as_str();
        domain == base || domain.strip_suffix(base).is_some_and(|head| head.ends_with('.'))
    })
}

/// The name the TXT record goes at: `_flotilla-challenge.<domain>` (for
/// `*.example.com`, at `_flotilla-challenge.example.com`).
pub fn verification_record_name(domain: &Hostname) -> String {
    let base = domain.as_str().strip_prefix("*.").unwrap_or(domain.as_str());
    format!("{VERIFICATION_LABEL}.{base}")
}

/// The TXT record's value for `token`.
pub fn verification_record_value(token: &str) -> String {
    format!("{VERIFICATION_PREFIX}{token}")
}

/// Whether one of the TXT `records` carries exactly `token`.
pub fn records_prove(records: &[String], token: &str) -> bool {
    let expected = verification_record_value(token);
    records.iter().any(|r| r.trim() == expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str) -> Hostname {
        Hostname::parse("domain", name).unwrap()
    }

    #[test]
    fn platform_domains_cover_themselves_and_what_is_under_them() {
        let platform = [host("apps.example.com")];
        for inside in ["apps.example.com", "web.apps.example.com", "a.b.apps.example.com", "*.apps.example.com"] {
            assert!(is_platform_domain(&platform, inside), "{inside}");
        }
        for outside in ["example.com", "evilapps.example.com", "apps.example.com.evil.org", "shop.example.org"] {
            assert!(!is_platform_domain(&platform, outside), "{outside}");
        }
        assert!(!is_platform_domain(&[], "web.apps.example.com"), "no platform domain: everything is custom");
    }

    #[test]
    fn the_record_name_and_value() {
        assert_eq!(verification_record_name(&host("shop.example.org")), "_flotilla-challenge.shop.example.org");
        assert_eq!(verification_record_name(&host("*.example.org")), "_flotilla-challenge.example.org");
        let records = vec!["v=spf1 -all".to_owned(), " flotilla-verification=abc ".to_owned()];
        assert!(records_prove(&records, "abc"));
        assert!(!records_prove(&records, "ab"), "a prefix of the token is not the token");
        assert!(!records_prove(&["flotilla-verification=abcd".to_owned()], "abc"));
        assert!(!records_prove(&[], "abc"));
    }
}
