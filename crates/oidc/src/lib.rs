//! OpenID Connect for Flotilla's API.
//!
//! [`Oidc::verify`] turns a bearer token into an [`Identity`]:
//! - a JWT is verified here, against the provider's published keys (JWKS,
//!   cached; fetched again when a token names a key we do not have, which is
//!   how a key rotation is picked up): signature, issuer, audience, expiry and
//!   not-before with a small leeway. No call to the provider per request, and
//!   a verified token is remembered until it expires, so the signature is
//!   checked once per token, not once per request;
//! - any other token is opaque: the provider's userinfo endpoint says whose it
//!   is. Its answer is cached for `userinfo_cache`, so a revoked token stops
//!   working within that time.
//!
//! Discovery happens on first use and is retried until it succeeds, so the
//! API starts while the provider is away and answers `unavailable` meanwhile.

pub mod device;
mod error;
pub mod metrics;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt as _, Empty};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use openidconnect::core::{
    CoreGenderClaim, CoreIdTokenVerifier, CoreJsonWebKey, CoreJsonWebKeySet, CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm, CoreProviderMetadata,
};
use openidconnect::{
    AdditionalClaims, ClaimsVerificationError, ClientId, IdToken, IssuerUrl, JsonWebKey as _, JsonWebKeyId,
    JsonWebTokenType, JwsSigningAlgorithm as _, Nonce, SignatureVerificationError,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub use error::TokenError;

/// How to reach and trust the identity provider.
#[derive(Debug, Clone)]
pub struct OidcSettings {
    /// The issuer URL; discovery reads `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    /// The audience tokens must name (the client id registered for Flotilla).
    pub audience: String,
    /// Clock difference tolerated on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// Keys are fetched again for an unknown key at most this often, so a
    /// flood of forged tokens cannot turn into a flood of JWKS requests.
    pub jwks_min_refresh: Duration,
    /// How long a userinfo answer for an opaque token is trusted.
    pub userinfo_cache: Duration,
    /// Timeout of each call to the provider.
    pub request_timeout: Duration,
}

impl OidcSettings {
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Self {
            issuer: issuer.into(),
            audience: audience.into(),
            leeway: Duration::from_secs(30),
            jwks_min_refresh: Duration::from_secs(10),
            userinfo_cache: Duration::from_secs(15),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// Who a token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The provider's subject identifier (`sub`).
    pub subject: String,
    pub email: Option<String>,
    pub kind: TokenKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Verified locally.
    Jwt,
    /// Resolved through userinfo.
    Opaque,
}

/// Counters for `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OidcStats {
    pub jwks_fetches: u64,
    /// Unknown keys that did not trigger a fetch (one was too recent).
    pub jwks_refreshes_suppressed: u64,
    pub userinfo_calls: u64,
    pub verified_cache_hits: u64,
}

/// Claims beyond the ID token's: `nbf`, which openidconnect does not check.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
struct ExtraClaims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<i64>,
}
impl AdditionalClaims for ExtraClaims {}

type Jwt = IdToken<ExtraClaims, CoreGenderClaim, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm>;

/// What discovery told us.
#[derive(Debug)]
struct Provider {
    jwks_uri: String,
    userinfo_endpoint: Option<String>,
    /// Asymmetric algorithms only: a shared secret would let any client forge.
    algorithms: Vec<CoreJwsSigningAlgorithm>,
}

#[derive(Debug)]
struct Keys {
    set: CoreJsonWebKeySet,
    fetched_at: Option<Instant>,
}

type TokenHash = [u8; 32];

/// Most tokens remembered per cache before expired ones are swept (and, if
/// still full, all are forgotten).
const CACHE_CAPACITY: usize = 20_000;

/// The OpenID Connect provider as Flotilla's API sees it. Cheap to share.
#[derive(Debug)]
pub struct Oidc {
    settings: OidcSettings,
    issuer: IssuerUrl,
    audience: ClientId,
    http: HttpClient,
    provider: tokio::sync::OnceCell<Provider>,
    keys: RwLock<Arc<Keys>>,
    refresh: tokio::sync::Mutex<()>,
    /// Verified JWTs and when they expire.
    verified: Mutex<HashMap<TokenHash, (Identity, DateTime<Utc>)>>,
    /// Userinfo answers and when they were fetched.
    userinfo: Mutex<HashMap<TokenHash, (Identity, Instant)>>,
    jwks_fetches: AtomicU64,
    jwks_refreshes_suppressed: AtomicU64,
    userinfo_calls: AtomicU64,
    verified_cache_hits: AtomicU64,
}

impl Oidc {
    pub fn new(settings: OidcSettings) -> Result<Self, TokenError> {
        let issuer = IssuerUrl::new(settings.issuer.clone())
            .map_err(|e| TokenError::ProviderUnavailable(format!("the issuer URL is not a URL: {e}")))?;
        let http = http_client()?;
        Ok(Self {
            audience: ClientId::new(settings.audience.clone()),
            issuer,
            http,
            settings,
            provider: tokio::sync::OnceCell::new(),
            keys: RwLock::new(Arc::new(Keys { set: CoreJsonWebKeySet::new(Vec::new()), fetched_at: None })),
            refresh: tokio::sync::Mutex::new(()),
            verified: Mutex::new(HashMap::new()),
            userinfo: Mutex::new(HashMap::new()),
            jwks_fetches: AtomicU64::new(0),
            jwks_refreshes_suppressed: AtomicU64::new(0),
            userinfo_calls: AtomicU64::new(0),
            verified_cache_hits: AtomicU64::new(0),
        })
    }

    pub fn settings(&self) -> &OidcSettings {
        &self.settings
    }

    pub fn stats(&self) -> OidcStats {
        OidcStats {
            jwks_fetches: self.jwks_fetches.load(Ordering::Relaxed),
            jwks_refreshes_suppressed: self.jwks_refreshes_suppressed.load(Ordering::Relaxed),
            userinfo_calls: self.userinfo_calls.load(Ordering::Relaxed),
            verified_cache_hits: self.verified_cache_hits.load(Ordering::Relaxed),
        }
    }

    /// Discovers the provider and fetches its keys now (otherwise the first
    /// request does). An error is worth a warning, not a failed start.
    pub async fn warm_up(&self) -> Result<(), TokenError> {
        let provider = self.provider().await?;
        if self.current_keys().fetched_at.is_none() {
            self.fetch_keys(provider).await?;
        }
        Ok(())
    }

    /// Whose token this is.
    pub async fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(TokenError::Empty);
        }
        let hash: TokenHash = Sha256::digest(token.as_bytes()).into();
        match jose_header(token) {
            Some(header) => self.verify_jwt(token, &header, hash).await,
            None => self.resolve_opaque(token, hash).await,
        }
    }

    async fn verify_jwt(&self, token: &str, header: &JoseHeader, hash: TokenHash) -> Result<Identity, TokenError> {
        let now = Utc::now();
        let leeway = chrono::Duration::from_std(self.settings.leeway).unwrap_or_else(|_| chrono::Duration::zero());
        if let Some(identity) = self.remembered_jwt(&hash, now - leeway) {
            self.verified_cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(identity);
        }
        let jwt: Jwt = token.parse().map_err(|e| TokenError::Malformed(format!("{e}")))?;
        let provider = self.provider().await?;
        let mut fetched_again = false;
        loop {
            let keys = self.current_keys();
            let kid = header.kid.clone().map(JsonWebKeyId::new);
            let mut failure = TokenError::UnknownKey;
            for key in keys.set.keys().iter().filter(|key| kid.is_none() || key.key_id() == kid.as_ref()) {
                match self.check(&jwt, key, provider, now, leeway) {
                    Ok((identity, expires_at)) => {
                        self.remember_jwt(hash, identity.clone(), expires_at, now - leeway);
                        return Ok(identity);
                    }
                    // Without a key id, another key may be the one.
                    Err(error @ (TokenError::BadSignature | TokenError::UnknownKey)) => failure = error,
                    Err(error) => return Err(error),
                }
            }
            // No key we hold verifies it: the provider may have rotated.
            if fetched_again || !self.refresh_keys(provider, keys.fetched_at).await? {
                return Err(failure);
            }
            fetched_again = true;
        }
    }

    /// Checks a JWT against one key.
    fn check(
        &self,
        jwt: &Jwt,
        key: &CoreJsonWebKey,
        provider: &Provider,
        now: DateTime<Utc>,
        leeway: chrono::Duration,
    ) -> Result<(Identity, DateTime<Utc>), TokenError> {
        let token_types =
            ["JWT", "at+jwt"].into_iter().filter_map(|t| JsonWebTokenType::new(t.to_owned()).normalize().ok());
        let verifier = CoreIdTokenVerifier::new_public_client(
            self.audience.clone(),
            self.issuer.clone(),
            CoreJsonWebKeySet::new(vec![key.clone()]),
        )
        .set_allowed_algs(provider.algorithms.iter().cloned())
        .set_allowed_jose_types(token_types)
        // Expired once `now - leeway` reaches `exp`.
        .set_time_fn(move || now - leeway)
        .set_issue_time_verifier_fn(move |issued| {
            if issued > now + leeway { Err(format!("{NOT_YET_VALID}issued at {issued}")) } else { Ok(()) }
        });
        // No nonce: these tokens come with requests, not from a login we started.
        let claims = jwt.claims(&verifier, |_: Option<&Nonce>| Ok(())).map_err(token_error)?;
        let not_before = claims.additional_claims().nbf.and_then(|nbf| DateTime::from_timestamp(nbf, 0));
        if let Some(not_before) = not_before.filter(|not_before| *not_before > now + leeway) {
            return Err(TokenError::NotYetValid(format!("not before {not_before}")));
        }
        let identity = Identity {
            subject: claims.subject().as_str().to_owned(),
            email: claims.email().map(|email| email.as_str().to_owned()),
            kind: TokenKind::Jwt,
        };
        Ok((identity, claims.expiration()))
    }

    async fn resolve_opaque(&self, token: &str, hash: TokenHash) -> Result<Identity, TokenError> {
        if let Some(identity) = self.remembered_userinfo(&hash) {
            return Ok(identity);
        }
        let provider = self.provider().await?;
        let Some(endpoint) = &provider.userinfo_endpoint else {
            return Err(TokenError::Malformed(
                "not a JWT, and the provider has no userinfo endpoint to resolve opaque tokens".to_owned(),
            ));
        };
        self.userinfo_calls.fetch_add(1, Ordering::Relaxed);
        let (status, body) = self.get(endpoint, Some(token), "userinfo").await?;
        // RFC 6750 says 401 `invalid_token`; providers also answer 400 or
        // 403 (oidc-provider-mock: 400 `access_denied`). Any 4xx refuses
        // the token; only 5xx and silence mean the provider is in trouble.
        if status.is_client_error() {
            return Err(TokenError::Inactive);
        }
        if !status.is_success() {
            return Err(TokenError::ProviderUnavailable(format!("userinfo answered {status}")));
        }
        #[derive(Deserialize)]
        struct UserInfo {
            sub: String,
            email: Option<String>,
        }
        let info: UserInfo = serde_json::from_slice(&body)
            .map_err(|e| TokenError::ProviderUnavailable(format!("userinfo answered something unreadable: {e}")))?;
        let identity = Identity { subject: info.sub, email: info.email, kind: TokenKind::Opaque };
        let mut cache = lock(&self.userinfo);
        if cache.len() >= CACHE_CAPACITY {
            let ttl = self.settings.userinfo_cache;
            cache.retain(|_, (_, fetched)| fetched.elapsed() < ttl);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(hash, (identity.clone(), Instant::now()));
        Ok(identity)
    }

    fn remembered_userinfo(&self, hash: &TokenHash) -> Option<Identity> {
        let cache = lock(&self.userinfo);
        let (identity, fetched) = cache.get(hash)?;
        (fetched.elapsed() < self.settings.userinfo_cache).then(|| identity.clone())
    }

    fn remembered_jwt(&self, hash: &TokenHash, now_less_leeway: DateTime<Utc>) -> Option<Identity> {
        let cache = lock(&self.verified);
        let (identity, expires_at) = cache.get(hash)?;
        (now_less_leeway < *expires_at).then(|| identity.clone())
    }

    fn remember_jwt(
        &self,
        hash: TokenHash,
        identity: Identity,
        expires_at: DateTime<Utc>,
        now_less_leeway: DateTime<Utc>,
    ) {
        let mut cache = lock(&self.verified);
        if cache.len() >= CACHE_CAPACITY {
            cache.retain(|_, (_, expires)| now_less_leeway < *expires);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(hash, (identity, expires_at));
    }

    async fn provider(&self) -> Result<&Provider, TokenError> {
        self.provider.get_or_try_init(|| self.discover()).await
    }

    async fn discover(&self) -> Result<Provider, TokenError> {
        let url = format!("{}/.well-known/openid-configuration", self.settings.issuer.trim_end_matches('/'));
        let metadata: CoreProviderMetadata = self.get_json(&url, "discovery").await?;
        if metadata.issuer() != &self.issuer {
            return Err(TokenError::ProviderUnavailable(format!(
                "the discovery document names the issuer {}, not {}",
                metadata.issuer().as_str(),
                self.issuer.as_str()
            )));
        }
        let algorithms: Vec<_> = metadata
            .id_token_signing_alg_values_supported()
            .iter()
            .filter(|alg| !alg.uses_shared_secret() && **alg != CoreJwsSigningAlgorithm::None)
            .cloned()
            .collect();
        if algorithms.is_empty() {
            return Err(TokenError::ProviderUnavailable(
                "the provider signs tokens with no asymmetric algorithm".to_owned(),
            ));
        }
        tracing::info!(issuer = %self.issuer.as_str(), "OIDC provider discovered");
        Ok(Provider {
            jwks_uri: metadata.jwks_uri().url().to_string(),
            userinfo_endpoint: metadata.userinfo_endpoint().map(|url| url.url().to_string()),
            algorithms,
        })
    }

    fn current_keys(&self) -> Arc<Keys> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Fetches the keys again unless someone just did. `seen` is when the
    /// keys the caller tried were fetched. Whether there are new keys to try.
    async fn refresh_keys(&self, provider: &Provider, seen: Option<Instant>) -> Result<bool, TokenError> {
        let _one_at_a_time = self.refresh.lock().await;
        let current = self.current_keys().fetched_at;
        if current != seen {
            return Ok(true);
        }
        if current.is_some_and(|at| at.elapsed() < self.settings.jwks_min_refresh) {
            self.jwks_refreshes_suppressed.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        self.fetch_keys(provider).await?;
        Ok(true)
    }

    async fn fetch_keys(&self, provider: &Provider) -> Result<(), TokenError> {
        self.jwks_fetches.fetch_add(1, Ordering::Relaxed);
        let set: CoreJsonWebKeySet = self.get_json(&provider.jwks_uri, "keys (JWKS)").await?;
        tracing::info!(keys = set.keys().len(), "OIDC signing keys fetched");
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(Keys { set, fetched_at: Some(Instant::now()) });
        Ok(())
    }

    /// GETs `url` (with `bearer` as credentials): the status and the body.
    async fn get(&self, url: &str, bearer: Option<&str>, what: &str) -> Result<(http::StatusCode, Bytes), TokenError> {
        let failed = |error: String| TokenError::ProviderUnavailable(format!("{what} at {url}: {error}"));
        let mut request = http::Request::get(url).header(http::header::ACCEPT, "application/json");
        if let Some(token) = bearer {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request.body(Empty::new()).map_err(|e| failed(e.to_string()))?;
        let exchange = async {
            let response = self.http.request(request).await.map_err(|e| failed(e.to_string()))?;
            let status = response.status();
            let body = response.into_body().collect().await.map_err(|e| failed(e.to_string()))?.to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.settings.request_timeout, exchange)
            .await
            .map_err(|_| failed(format!("no answer within {:?}", self.settings.request_timeout)))?
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str, what: &str) -> Result<T, TokenError> {
        let (status, body) = self.get(url, None, what).await?;
        if !status.is_success() {
            return Err(TokenError::ProviderUnavailable(format!("{what} at {url} answered {status}")));
        }
        serde_json::from_slice(&body)
            .map_err(|e| TokenError::ProviderUnavailable(format!("{what} at {url} is not what OIDC describes: {e}")))
    }
}

/// Marks the issue-time check's message, so it maps to "not yet valid".
const NOT_YET_VALID: &str = "not yet valid: ";

fn token_error(error: ClaimsVerificationError) -> TokenError {
    match error {
        ClaimsVerificationError::Expired(message) => match message.strip_prefix(NOT_YET_VALID) {
            Some(rest) => TokenError::NotYetValid(rest.to_owned()),
            None => TokenError::Expired(message),
        },
        ClaimsVerificationError::InvalidIssuer(message) => TokenError::WrongIssuer(message),
        ClaimsVerificationError::InvalidAudience(message) => TokenError::WrongAudience(message),
        ClaimsVerificationError::SignatureVerification(error) => match error {
            SignatureVerificationError::CryptoError(_) => TokenError::BadSignature,
            SignatureVerificationError::NoMatchingKey | SignatureVerificationError::InvalidKey(_) => {
                TokenError::UnknownKey
            }
            SignatureVerificationError::NoSignature => TokenError::DisallowedAlgorithm("unsigned".to_owned()),
            SignatureVerificationError::DisallowedAlg(message)
            | SignatureVerificationError::UnsupportedAlg(message) => TokenError::DisallowedAlgorithm(message),
            other => TokenError::Malformed(other.to_string()),
        },
        other => TokenError::Malformed(other.to_string()),
    }
}

/// An HTTP(S) client sending request bodies of `B`.
type HttpsClient<B> = hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, B>;
type HttpClient = HttpsClient<Empty<Bytes>>;

/// An HTTP(S) client with ring and the system's trusted roots (none found:
/// https fails with a clear error, http still works), sending bodies of `B`.
fn http_client<B>() -> Result<HttpsClient<B>, TokenError>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_roots();
    let (added, _ignored) = roots.add_parsable_certificates(native);
    if added == 0 {
        tracing::warn!("no trusted root certificates found: an https OIDC issuer cannot be verified");
    }
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TokenError::ProviderUnavailable(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
    Ok(hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(https))
}

fn rustls_native_roots() -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        tracing::warn!(%error, "reading the system's root certificates");
    }
    found.certs
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Deserialize)]
struct JoseHeader {
    #[allow(dead_code, reason = "its presence is what tells a JWT from an opaque token")]
    alg: String,
    kid: Option<String>,
}

/// The JOSE header if the token is shaped like a JWS (three base64url parts,
/// the first a JSON object with `alg`); `None` for an opaque token.
fn jose_header(token: &str) -> Option<JoseHeader> {
    let mut parts = token.split('.');
    let (header, _payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).ok()?;
    serde_json::from_slice(&json).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_jws_shaped_tokens_take_the_jwt_path() {
        let header = |json: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
        let jwt = format!("{}.e30.c2ln", header(r#"{"alg":"RS256","kid":"k1"}"#));
        assert_eq!(jose_header(&jwt).and_then(|h| h.kid).as_deref(), Some("k1"));
        let unsigned = format!("{}.e30.", header(r#"{"alg":"none"}"#));
        assert!(jose_header(&unsigned).is_some(), "an unsigned JWT must still be judged as a JWT");
        for opaque in
            ["AkAkhVdr4gXn3aquUrI7eiUFWUT7FL5OBqQHAf8LDw", "a.b.c", "a.b", &format!("{}.e30.x.y", header("{}"))]
        {
            assert!(jose_header(opaque).is_none(), "{opaque} is not a JWT");
        }
    }

    #[test]
    fn the_issue_time_check_maps_to_not_yet_valid() {
        let error = token_error(ClaimsVerificationError::Expired(format!("{NOT_YET_VALID}issued at X")));
        assert_eq!(error, TokenError::NotYetValid("issued at X".to_owned()));
        assert!(matches!(token_error(ClaimsVerificationError::Expired("at Y".into())), TokenError::Expired(_)));
    }
}
