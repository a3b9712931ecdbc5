//! `GET /traefik/dynamic`: the cluster-wide route table for Traefik's HTTP
//! provider, rendered from the database on every poll (one consistent read),
//! so it never lags behind `deployment_locations`. Served by processes that
//! run the orchestrator role.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use flotilla_orchestrator::route_table;
use flotilla_store::Store;
use flotilla_types::routing::EdgeSettings;

pub const ROUTE_TABLE_PATH: &str = "/traefik/dynamic";

#[derive(Clone)]
struct EdgeState {
    store: Store,
    edge: EdgeSettings,
}

pub fn router(store: Store, edge: EdgeSettings) -> axum::Router {
    axum::Router::new().route(ROUTE_TABLE_PATH, get(route_table_handler)).with_state(EdgeState { store, edge })
}

async fn route_table_handler(State(state): State<EdgeState>) -> Response {
    match state.store.route_table().await {
        Ok(rows) => {
            let table = route_table::render(&rows, &state.edge);
            for invalid in &table.invalid {
                tracing::error!(route = %invalid, "a route row failed validation and was left out of the route table");
            }
            Json(table.config).into_response()
        }
        // An error, not an empty table: Traefik keeps its last good
        // configuration instead of dropping every route.
        Err(error) => {
            tracing::warn!(%error, "route table unavailable");
            (StatusCode::SERVICE_UNAVAILABLE, "route table unavailable: the control database cannot be reached")
                .into_response()
        }
    }
}
