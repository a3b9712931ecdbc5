//! Changes as PostgreSQL announces them (NOTIFY from triggers): of each
//! deployment (on `deployments` and `deployment_locations`), and of anything
//! the route table reads. One listening connection per process, fanned out
//! to whoever watches.

use std::time::Duration;

use flotilla_types::DeploymentId;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::Store;

/// The NOTIFY channel of the triggers (migration 20261121000009).
pub const CHANNEL: &str = "flotilla_deployment_changed";

/// What a watcher hears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// This deployment (or one of its replicas) changed.
    Deployment(DeploymentId),
    /// Something the route table reads changed.
    Routes,
    /// Listening (re)started: changes since the last notice may have been
    /// missed, so anything may have changed.
    Resync,
}

impl Store {
    /// Listens until `cancel`, sending each change to `changes`. A lost
    /// connection is re-established (with a pause); what changed meanwhile
    /// is not announced, so each (re)start of listening sends
    /// [`Change::Resync`].
    pub async fn announce_changes(&self, changes: broadcast::Sender<Change>, cancel: CancellationToken) {
        while !cancel.is_cancelled() {
            let mut listener = match PgListener::connect_with(&self.pool).await {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for deployment changes; retrying in 2 s");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(2)) => continue,
                    }
                }
            };
            if let Err(error) = listener.listen_all([CHANNEL, crate::routes::CHANNEL]).await {
                tracing::warn!(%error, "LISTEN failed; retrying in 2 s");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
            let _ = changes.send(Change::Resync);
            loop {
                let notification = tokio::select! {
                    () = cancel.cancelled() => return,
                    notification = listener.try_recv() => notification,
                };
                match notification {
                    // No receivers is fine: nobody watches now.
                    Ok(Some(notification)) if notification.channel() == crate::routes::CHANNEL => {
                        let _ = changes.send(Change::Routes);
                    }
                    Ok(Some(notification)) => {
                        if let Ok(id) = notification.payload().parse::<DeploymentId>() {
                            let _ = changes.send(Change::Deployment(id));
                        }
                    }
                    // The connection was lost: listen again on a new one.
                    Ok(None) => break,
                    Err(error) => {
                        tracing::warn!(%error, "listening for deployment changes failed; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}
