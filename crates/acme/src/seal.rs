//! Sealing secrets at rest (certificate keys, the ACME account's key) with
//! AES-256-GCM under a key derived from a Docker secret's contents.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::AcmeError;

/// The first byte of every sealed value: the format, so a later one can be
/// told apart.
const FORMAT: u8 = 1;

/// The shortest secret accepted (bytes, after trimming).
pub const MIN_SECRET_LEN: usize = 16;

pub struct Sealer {
    key: LessSafeKey,
    random: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    /// From a secret (e.g. `openssl rand -hex 32`); surrounding whitespace
    /// is ignored, so a trailing newline in the file does not change the key.
    pub fn from_secret(secret: &[u8]) -> Result<Self, AcmeError> {
        let secret = secret.trim_ascii();
        if secret.len() < MIN_SECRET_LEN {
            return Err(AcmeError::Config(format!(
                "the certificate key secret has {} bytes; at least {MIN_SECRET_LEN} are needed \
                 (e.g. `openssl rand -hex 32`)",
                secret.len()
            )));
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, secret);
        let key = UnboundKey::new(&AES_256_GCM, digest.as_ref())
            .map_err(|_| AcmeError::Config("the certificate key could not be made".into()))?;
        Ok(Self { key: LessSafeKey::new(key), random: SystemRandom::new() })
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self, AcmeError> {
        let secret = std::fs::read(path)
            .map_err(|e| AcmeError::Config(format!("reading the certificate key secret {}: {e}", path.display())))?;
        Self::from_secret(&secret)
    }

    /// `FORMAT || nonce || ciphertext || tag`; `context` (e.g. the domain)
    /// is authenticated, so a sealed key cannot be moved to another row.
    pub fn seal(&self, plaintext: &[u8], context: &str) -> Result<Vec<u8>, AcmeError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).map_err(|_| AcmeError::Crypto("no randomness for a nonce"))?;
        let mut in_out = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(context.as_bytes()), &mut in_out)
            .map_err(|_| AcmeError::Crypto("sealing failed"))?;
        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + in_out.len());
        sealed.push(FORMAT);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&in_out);
        Ok(sealed)
    }

    pub fn open(&self, sealed: &[u8], context: &str) -> Result<Vec<u8>, AcmeError> {
        let opened = match sealed.split_first() {
            Some((&FORMAT, rest)) if rest.len() > NONCE_LEN => {
                let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
                let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| AcmeError::Crypto("bad nonce"))?;
                let mut in_out = ciphertext.to_vec();
                self.key
                    .open_in_place(nonce, Aad::from(context.as_bytes()), &mut in_out)
                    .map(|plain| plain.to_vec())
                    .ok()
            }
            _ => None,
        };
        opened.ok_or(AcmeError::Crypto("a sealed value could not be opened: another key, another row, or damaged"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_same_key_and_context() {
        let sealer = Sealer::from_secret(b"0123456789abcdef0123456789abcdef\n").unwrap();
        let sealed = sealer.seal(b"-----BEGIN PRIVATE KEY-----", "shop.example.org").unwrap();
        assert!(!sealed.windows(5).any(|w| w == b"BEGIN"), "not in the clear");
        assert_eq!(sealer.open(&sealed, "shop.example.org").unwrap(), b"-----BEGIN PRIVATE KEY-----");
        assert!(sealer.open(&sealed, "blog.example.org").is_err(), "bound to its row");
        let other = Sealer::from_secret(b"another secret of enough length").unwrap();
        assert!(other.open(&sealed, "shop.example.org").is_err());
        let mut damaged = sealed;
        *damaged.last_mut().unwrap() ^= 1;
        assert!(sealer.open(&damaged, "shop.example.org").is_err());
        assert!(sealer.open(&[], "shop.example.org").is_err());
        assert_ne!(sealer.seal(b"x", "c").unwrap(), sealer.seal(b"x", "c").unwrap(), "a fresh nonce each time");
    }

    #[test]
    fn a_short_secret_is_refused() {
        let error = Sealer::from_secret(b"  short \n").unwrap_err().to_string();
        assert!(error.contains("at least 16"), "{error}");
    }
}
