//! `GET /.well-known/acme-challenge/{token}`: HTTP-01 answers for the
//! certificate orders under way. Any orchestrator answers any order: the
//! key authorizations are in the database.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use flotilla_store::Store;

pub const ACME_CHALLENGE_PATH: &str = "/.well-known/acme-challenge/{token}";

pub fn router(store: Store) -> axum::Router {
    axum::Router::new().route(ACME_CHALLENGE_PATH, axum::routing::get(answer)).with_state(store)
}

async fn answer(State(store): State<Store>, Path(token): Path<String>) -> Response {
    // Tokens are base64url (RFC 8555 §8.3); anything else is not ours.
    if token.is_empty()
        || token.len() > 128
        || !token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return StatusCode::NOT_FOUND.into_response();
    }
    match store.acme_challenge(&token).await {
        Ok(Some(key_authorization)) => ([(header::CONTENT_TYPE, "text/plain")], key_authorization).into_response(),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(error) => {
            tracing::warn!(%error, "ACME challenge unavailable");
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    }
}
