//! The OAuth 2.0 device authorization grant (RFC 8628), for `flo login`:
//! the terminal shows a code, the user approves it in a browser, and the
//! terminal polls the provider's token endpoint until it answers.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use serde::Deserialize;

use crate::{HttpsClient, http_client};

const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// Added to the interval on each `slow_down` (RFC 8628, section 3.5).
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DeviceFlowError {
    #[error("cannot reach {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("the identity provider {issuer} does not offer the device flow (no device_authorization_endpoint)")]
    NotSupported { issuer: String },
    #[error("the identity provider refused: {error}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Refused { error: String, description: Option<String> },
    #[error("the sign-in was denied in the browser")]
    Denied,
    #[error("the code expired before the sign-in was approved")]
    Expired,
    #[error("unexpected answer from {url}: {message}")]
    Malformed { url: String, message: String },
}

/// What the user must do: open `verification_uri` and enter `user_code`.
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceAuthorization {
    pub device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    /// The same page with the code filled in, when the provider offers it.
    pub verification_uri_complete: Option<String>,
    /// Seconds the codes stay valid.
    pub expires_in: u64,
    /// Seconds to wait between polls (5 when the provider does not say).
    pub interval: Option<u64>,
}

/// What the provider issued once the user approved.
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceTokens {
    pub access_token: String,
    pub id_token: Option<String>,
    pub expires_in: Option<u64>,
}

impl DeviceTokens {
    /// The token to present to Flotilla: the ID token (a JWT whose audience
    /// is the client, checked locally) when there is one, else the access
    /// token (resolved through userinfo).
    pub fn bearer(&self) -> &str {
        self.id_token.as_deref().unwrap_or(&self.access_token)
    }
}

#[derive(Debug, Deserialize)]
struct Discovery {
    token_endpoint: String,
    device_authorization_endpoint: Option<String>,
}

#[derive(Debug, Deserialize)]
struct OAuthError {
    error: String,
    error_description: Option<String>,
}

/// Where a Flotilla API says its users sign in (`GET <api>/login/config`).
#[derive(Debug, Clone, Deserialize)]
pub struct LoginConfig {
    pub issuer: String,
    pub client_id: String,
}

/// The API's [`LoginConfig`]; `None` when it announces none (an API in
/// development mode, or one older than the endpoint).
pub async fn login_config(api: &str) -> Result<Option<LoginConfig>, DeviceFlowError> {
    let client = http_client::<Full<Bytes>>()
        .map_err(|e| DeviceFlowError::Unreachable { url: api.to_owned(), message: e.to_string() })?;
    let url = format!("{}/login/config", api.trim_end_matches('/'));
    let (status, body) = exchange(&client, http::Method::GET, &url, None).await?;
    match status {
        200 => serde_json::from_slice(&body).map(Some).map_err(|e| malformed(&url, e.to_string())),
        404 => Ok(None),
        other => Err(malformed(&url, format!("HTTP {other}"))),
    }
}

/// A provider's device flow for one client.
pub struct DeviceFlow {
    client: HttpsClient<Full<Bytes>>,
    client_id: String,
    device_endpoint: String,
    token_endpoint: String,
}

impl DeviceFlow {
    /// Reads the issuer's discovery document; a provider without a device
    /// endpoint is [`DeviceFlowError::NotSupported`].
    pub async fn discover(issuer: &str, client_id: &str) -> Result<Self, DeviceFlowError> {
        let client = http_client::<Full<Bytes>>()
            .map_err(|e| DeviceFlowError::Unreachable { url: issuer.to_owned(), message: e.to_string() })?;
        let url = format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'));
        let (status, body) = exchange(&client, http::Method::GET, &url, None).await?;
        if status != 200 {
            return Err(malformed(&url, format!("HTTP {status}")));
        }
        let discovery: Discovery = serde_json::from_slice(&body).map_err(|e| malformed(&url, e.to_string()))?;
        let device_endpoint = discovery
            .device_authorization_endpoint
            .ok_or_else(|| DeviceFlowError::NotSupported { issuer: issuer.to_owned() })?;
        Ok(Self { client, client_id: client_id.to_owned(), device_endpoint, token_endpoint: discovery.token_endpoint })
    }

    /// Asks for a device code and the code the user types.
    pub async fn start(&self, scope: &str) -> Result<DeviceAuthorization, DeviceFlowError> {
        let form = form(&[("client_id", &self.client_id), ("scope", scope)]);
        let (status, body) = exchange(&self.client, http::Method::POST, &self.device_endpoint, Some(form)).await?;
        if status != 200 {
            return Err(refusal(&self.device_endpoint, status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| malformed(&self.device_endpoint, e.to_string()))
    }

    /// Polls the token endpoint at the interval asked (slower on
    /// `slow_down`) until the user approves, denies, or the code expires.
    pub async fn wait(&self, authorization: &DeviceAuthorization) -> Result<DeviceTokens, DeviceFlowError> {
        let mut interval = Duration::from_secs(authorization.interval.unwrap_or(5).max(1));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(authorization.expires_in);
        loop {
            tokio::time::sleep(interval).await;
            if tokio::time::Instant::now() > deadline {
                return Err(DeviceFlowError::Expired);
            }
            let form = form(&[
                ("grant_type", DEVICE_CODE_GRANT),
                ("device_code", &authorization.device_code),
                ("client_id", &self.client_id),
            ]);
            let (status, body) = exchange(&self.client, http::Method::POST, &self.token_endpoint, Some(form)).await?;
            if status == 200 {
                return serde_json::from_slice(&body).map_err(|e| malformed(&self.token_endpoint, e.to_string()));
            }
            match serde_json::from_slice::<OAuthError>(&body) {
                Ok(e) if e.error == "authorization_pending" => {}
                Ok(e) if e.error == "slow_down" => interval += SLOW_DOWN_STEP,
                Ok(e) if e.error == "access_denied" => return Err(DeviceFlowError::Denied),
                Ok(e) if e.error == "expired_token" => return Err(DeviceFlowError::Expired),
                _ => return Err(refusal(&self.token_endpoint, status, &body)),
            }
        }
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (name, value) in pairs {
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(&percent_encode(name));
        out.push('=');
        out.push_str(&percent_encode(value));
    }
    out
}

/// `application/x-www-form-urlencoded` escaping of one name or value.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(byte as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

fn malformed(url: &str, message: String) -> DeviceFlowError {
    DeviceFlowError::Malformed { url: url.to_owned(), message }
}

fn refusal(url: &str, status: u16, body: &[u8]) -> DeviceFlowError {
    match serde_json::from_slice::<OAuthError>(body) {
        Ok(e) => DeviceFlowError::Refused { error: e.error, description: e.error_description },
        Err(_) => malformed(url, format!("HTTP {status}")),
    }
}

async fn exchange(
    client: &HttpsClient<Full<Bytes>>,
    method: http::Method,
    url: &str,
    form: Option<String>,
) -> Result<(u16, Bytes), DeviceFlowError> {
    let unreachable = |message: String| DeviceFlowError::Unreachable { url: url.to_owned(), message };
    let mut request = http::Request::builder().method(method).uri(url).header("accept", "application/json");
    if form.is_some() {
        request = request.header("content-type", "application/x-www-form-urlencoded");
    }
    let request =
        request.body(Full::new(Bytes::from(form.unwrap_or_default()))).map_err(|e| unreachable(e.to_string()))?;
    let answer = async {
        let response = client.request(request).await.map_err(|e| unreachable(e.to_string()))?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.map_err(|e| unreachable(e.to_string()))?.to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, answer)
        .await
        .map_err(|_| unreachable(format!("no answer within {REQUEST_TIMEOUT:?}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_values_are_escaped() {
        assert_eq!(
            form(&[("grant_type", DEVICE_CODE_GRANT), ("scope", "openid email")]),
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Adevice_code&scope=openid+email"
        );
        assert_eq!(percent_encode("a&b=c/é"), "a%26b%3Dc%2F%C3%A9");
    }

    #[test]
    fn the_id_token_is_preferred_as_bearer() {
        let tokens = DeviceTokens { access_token: "opaque".into(), id_token: Some("jwt".into()), expires_in: None };
        assert_eq!(tokens.bearer(), "jwt");
        let tokens = DeviceTokens { id_token: None, ..tokens };
        assert_eq!(tokens.bearer(), "opaque");
    }
}
