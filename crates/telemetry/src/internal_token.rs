//! The internal token every process of a cluster shares
//! (`--internal-token`): it authorizes one Flotilla process's requests to
//! another (log reads, the route table's certificates). Nothing behind it is
//! for users.

use axum::http::{HeaderMap, header};

/// Whether the request carries `Authorization: Bearer <token>`.
pub fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    given.is_some_and(|given| same_token(given.as_bytes(), token.as_bytes()))
}

/// Compares without stopping at the first difference.
fn same_token(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn only_the_exact_token_matches() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            headers
        };
        assert!(bearer_matches(&with("Bearer s3cret"), "s3cret"));
        for other in ["Bearer s3cre", "Bearer s3cret2", "bearer s3cret", "s3cret", "Bearer "] {
            assert!(!bearer_matches(&with(other), "s3cret"), "{other}");
        }
        assert!(!bearer_matches(&HeaderMap::new(), "s3cret"));
    }
}
