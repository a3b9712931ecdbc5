//! What Traefik reads from the orchestrator role:
//! - `GET /traefik/dynamic`: the cluster-wide route table for Traefik's HTTP
//!   provider, rendered from the database on every poll (one consistent
//!   read), so it never lags behind `deployment_locations`. Certificates
//!   Flotilla holds go into its `tls.certificates`, but only for a caller
//!   with the cluster's internal token: private keys never leave to anyone
//!   else.
//! - `GET /.well-known/acme-challenge/{token}`: HTTP-01 answers for the
//!   certificate orders under way (any replica answers any order).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use flotilla_acme::Sealer;
use flotilla_orchestrator::route_table::{self, TlsCertificate};
use flotilla_store::Store;
use flotilla_types::routing::EdgeSettings;

use crate::internal::bearer_matches;

pub const ROUTE_TABLE_PATH: &str = "/traefik/dynamic";
pub const ACME_CHALLENGE_PATH: &str = "/.well-known/acme-challenge/{token}";

#[derive(Clone)]
struct EdgeState {
    store: Store,
    edge: EdgeSettings,
    /// Opens stored keys; `None` when Flotilla orders no certificates.
    sealer: Option<Arc<Sealer>>,
    internal_token: Arc<str>,
}

pub fn router(store: Store, edge: EdgeSettings, sealer: Option<Arc<Sealer>>, internal_token: Arc<str>) -> axum::Router {
    axum::Router::new()
        .route(ROUTE_TABLE_PATH, get(route_table_handler))
        .route(ACME_CHALLENGE_PATH, get(acme_challenge_handler))
        .with_state(EdgeState { store, edge, sealer, internal_token })
}

async fn route_table_handler(State(state): State<EdgeState>, headers: HeaderMap) -> Response {
    let certificates = match (&state.sealer, bearer_matches(&headers, &state.internal_token)) {
        (Some(sealer), true) => match certificates(&state.store, sealer).await {
            Ok(certificates) => certificates,
            Err(response) => return response,
        },
        _ => Vec::new(),
    };
    match state.store.route_table().await {
        Ok(rows) => {
            let table = route_table::render(&rows, &state.edge, &certificates);
            for invalid in &table.invalid {
                tracing::error!(route = %invalid, "a route row failed validation and was left out of the route table");
            }
            Json(table.config).into_response()
        }
        // An error, not an empty table: Traefik keeps its last good
        // configuration instead of dropping every route.
        Err(error) => unavailable(&error),
    }
}

fn unavailable(error: &dyn std::fmt::Display) -> Response {
    tracing::warn!(%error, "route table unavailable");
    (StatusCode::SERVICE_UNAVAILABLE, "route table unavailable: the control database cannot be reached").into_response()
}

/// The routed domains' certificates with their keys opened. A key that
/// cannot be opened (another sealing key) is left out and logged; the
/// domain then falls back to Traefik's default certificate.
async fn certificates(store: &Store, sealer: &Sealer) -> Result<Vec<TlsCertificate>, Response> {
    let stored = store.routed_certificates().await.map_err(|e| unavailable(&e))?;
    Ok(stored
        .into_iter()
        .filter_map(|c| match sealer.open(&c.key_sealed, &c.domain).map(String::from_utf8) {
            Ok(Ok(key_pem)) => Some(TlsCertificate { domain: c.domain, chain_pem: c.chain_pem, key_pem }),
            Ok(Err(_)) | Err(_) => {
                tracing::error!(domain = %c.domain, "a stored certificate key cannot be opened with this key; left out");
                None
            }
        })
        .collect())
}

async fn acme_challenge_handler(State(state): State<EdgeState>, Path(token): Path<String>) -> Response {
    // Tokens are base64url (RFC 8555 §8.3); anything else is not ours.
    if token.is_empty()
        || token.len() > 128
        || !token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return StatusCode::NOT_FOUND.into_response();
    }
    match state.store.acme_challenge(&token).await {
        Ok(Some(key_authorization)) => ([(header::CONTENT_TYPE, "text/plain")], key_authorization).into_response(),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(error) => {
            tracing::warn!(%error, "ACME challenge unavailable");
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    }
}
