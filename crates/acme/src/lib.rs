//! Certificates Flotilla orders itself, from an ACME server (instant-acme):
//! for verified custom domains, and for the platform's own domains when the
//! operator prefers it to Traefik's resolver.
//!
//! [`CertificateManager`] is a reconciler: each pass reads which routed
//! domains want a certificate, and orders those that have none or whose
//! certificate ends within `renew_before`, one at a time. A domain is
//! ordered under a PostgreSQL advisory lock, so only one replica orders it.
//! The HTTP-01 key authorizations go to the database, where any replica's
//! `/.well-known/acme-challenge/` answers them. Keys are sealed
//! ([`seal::Sealer`]) before they are stored. A failed order is recorded on
//! the certificate (error, count, next attempt with exponential backoff),
//! where the deployment's owner sees it.

pub mod challenge;
pub mod metrics;
pub mod seal;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_runtime::{Next, PeriodicTask, run_periodically};
use flotilla_store::domains::CertificateNeed;
use flotilla_store::{Store, StoreError};
use flotilla_telemetry::Telemetry;
use flotilla_types::Hostname;
use flotilla_types::domains::is_platform_domain;
use instant_acme::{
    Account, AccountBuilder, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder,
    Order, OrderStatus, RetryPolicy,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use seal::Sealer;

/// The reconciler's name (task, health component).
pub const COMPONENT: &str = "certificates";

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("certificate settings: {0}")]
    Config(String),
    #[error("{0}")]
    Crypto(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("ACME {step} for {domain}: {source}")]
    Protocol {
        step: &'static str,
        domain: String,
        #[source]
        source: instant_acme::Error,
    },
    #[error("the challenge for {domain} failed: {detail}")]
    ChallengeFailed { domain: String, detail: String },
    #[error("the certificate for {domain} cannot be read: {detail}")]
    BadCertificate { domain: String, detail: String },
    #[error("the ACME account's stored credentials cannot be read: {0}")]
    Credentials(String),
}

#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// The ACME directory, e.g. Let's Encrypt's.
    pub directory_url: String,
    /// `mailto:` addresses for the CA's expiry notices.
    pub contact: Vec<String>,
    /// A PEM root to trust for the ACME server's own TLS (a private CA or a
    /// test server); otherwise the system's roots.
    pub ca_file: Option<PathBuf>,
    /// A certificate is renewed when it ends within this long.
    pub renew_before: Duration,
    /// Backoff after a failed order: the first wait, doubled per failure up
    /// to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// A pass runs at least this often.
    pub interval: Duration,
    /// How long one order may wait for the CA (validation, issuance).
    pub order_timeout: Duration,
    /// The platform's domains, and whether Flotilla orders for them too.
    pub platform_domains: Vec<Hostname>,
    pub platform_too: bool,
}

impl AcmeSettings {
    pub fn new(directory_url: impl Into<String>) -> Self {
        Self {
            directory_url: directory_url.into(),
            contact: Vec::new(),
            ca_file: None,
            renew_before: Duration::from_secs(30 * 24 * 3600),
            retry_min: Duration::from_secs(60),
            retry_max: Duration::from_secs(6 * 3600),
            interval: Duration::from_secs(60),
            order_timeout: Duration::from_secs(90),
            platform_domains: Vec::new(),
            platform_too: false,
        }
    }
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct CertificateStats {
    pub issued: AtomicU64,
    pub renewed: AtomicU64,
    pub failed: AtomicU64,
    /// Domains skipped because another replica held their lock.
    pub locked_elsewhere: AtomicU64,
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PassReport {
    pub wanted: usize,
    pub issued: Vec<String>,
    pub renewed: Vec<String>,
    pub failed: Vec<String>,
    /// Failed before, waiting out their backoff.
    pub backing_off: Vec<String>,
    pub locked_elsewhere: Vec<String>,
}

impl PassReport {
    /// What the health endpoint says while some domain has no good certificate.
    pub fn problem(&self) -> Option<String> {
        let failing: Vec<&str> = self.failed.iter().chain(&self.backing_off).map(String::as_str).collect();
        (!failing.is_empty()).then(|| format!("certificate orders failing for {}", failing.join(", ")))
    }
}

/// What became of one due domain.
enum Outcome {
    Issued,
    Renewed,
    Failed,
    /// Another replica renewed it before the lock was ours.
    NoLongerDue,
}

/// A certificate as the CA issued it.
struct Issued {
    chain_pem: String,
    key_pem: String,
    not_after: DateTime<Utc>,
}

pub struct CertificateManager {
    store: Store,
    settings: AcmeSettings,
    sealer: Arc<Sealer>,
    account: tokio::sync::Mutex<Option<Account>>,
    stats: Arc<CertificateStats>,
}

impl CertificateManager {
    pub fn new(store: Store, settings: AcmeSettings, sealer: Arc<Sealer>) -> Arc<Self> {
        Arc::new(Self {
            store,
            settings,
            sealer,
            account: tokio::sync::Mutex::new(None),
            stats: Arc::new(CertificateStats::default()),
        })
    }

    pub fn stats(&self) -> Arc<CertificateStats> {
        self.stats.clone()
    }

    pub fn sealer(&self) -> Arc<Sealer> {
        self.sealer.clone()
    }

    /// The reconciler on its timer until `cancel`; its last pass is
    /// reported as the `certificates` component of the health endpoint.
    pub fn spawn(self: &Arc<Self>, telemetry: Telemetry, tracker: &TaskTracker, cancel: CancellationToken) {
        let task = PeriodicTask { name: COMPONENT, interval: self.settings.interval, wake: None, pass_at_start: true };
        let manager = self.clone();
        tracker.spawn(run_periodically(task, cancel, move || {
            let (manager, telemetry) = (manager.clone(), telemetry.clone());
            async move {
                match manager.pass().await {
                    Ok(report) => {
                        telemetry.health.report_pass(COMPONENT, report.problem().as_deref(), serde_json::json!(report));
                        Next::Interval
                    }
                    Err(error) => {
                        tracing::warn!(%error, "certificate pass failed");
                        telemetry.health.report_pass(COMPONENT, Some(&error.to_string()), serde_json::json!({}));
                        Next::RetrySoon
                    }
                }
            }
        }));
    }

    /// One pass over every domain that wants a certificate.
    #[tracing::instrument(name = "certificates.pass", skip_all, err)]
    pub async fn pass(&self) -> Result<PassReport, AcmeError> {
        let platform = &self.settings.platform_domains;
        let mut needs = self.store.certificate_needs().await?;
        needs.retain(|n| n.verified || (self.settings.platform_too && is_platform_domain(platform, &n.domain)));
        let mut report = PassReport { wanted: needs.len(), ..PassReport::default() };
        let now = Utc::now();
        report.backing_off = needs
            .iter()
            .filter(|n| n.failures.unwrap_or(0) > 0 && n.next_attempt_at.is_some_and(|at| at > now))
            .map(|n| n.domain.clone())
            .collect();
        for need in needs.iter().filter(|n| self.due(n, now)) {
            let Some(lock) = self.store.try_lock_certificate(&need.domain).await? else {
                self.stats.locked_elsewhere.fetch_add(1, Ordering::Relaxed);
                report.locked_elsewhere.push(need.domain.clone());
                continue;
            };
            let outcome = self.renew_under_lock(need).await;
            let cleared = self.store.clear_acme_challenges(&need.domain).await;
            lock.release().await?;
            cleared?;
            let list = match outcome? {
                Outcome::Issued => &mut report.issued,
                Outcome::Renewed => &mut report.renewed,
                Outcome::Failed => &mut report.failed,
                Outcome::NoLongerDue => continue,
            };
            list.push(need.domain.clone());
        }
        Ok(report)
    }

    /// Orders `need`'s certificate if it is still due now that the lock is
    /// held (another replica may have just renewed it). A failure is
    /// recorded on the certificate, not returned.
    async fn renew_under_lock(&self, need: &CertificateNeed) -> Result<Outcome, AcmeError> {
        let stored = self.store.certificate(&need.domain).await?;
        if stored.as_ref().is_some_and(|c| !self.renewal_due(c.not_after)) {
            return Ok(Outcome::NoLongerDue);
        }
        let renewal = stored.is_some();
        match self.obtain(&need.domain).await {
            Ok(issued) => {
                let sealed = self.sealer.seal(issued.key_pem.as_bytes(), &need.domain)?;
                self.store.save_certificate(&need.domain, &issued.chain_pem, &sealed, issued.not_after).await?;
                let counter = if renewal { &self.stats.renewed } else { &self.stats.issued };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::info!(domain = %need.domain, not_after = %issued.not_after, renewal, "certificate stored");
                Ok(if renewal { Outcome::Renewed } else { Outcome::Issued })
            }
            Err(AcmeError::Store(error)) => Err(AcmeError::Store(error)),
            Err(error) => {
                let failures = u32::try_from(need.failures.unwrap_or(0)).unwrap_or(u32::MAX);
                let wait = backoff(self.settings.retry_min, self.settings.retry_max, failures);
                let next = Utc::now() + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX);
                self.store.record_certificate_failure(&need.domain, &error.to_string(), next).await?;
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(domain = %need.domain, %error, retry_at = %next, "certificate order failed");
                Ok(Outcome::Failed)
            }
        }
    }

    fn renewal_due(&self, not_after: DateTime<Utc>) -> bool {
        let renew_before = chrono::Duration::from_std(self.settings.renew_before).unwrap_or(chrono::Duration::MAX);
        not_after - Utc::now() <= renew_before
    }

    /// Wanted now: none yet or ending soon, and not waiting out a backoff.
    fn due(&self, need: &CertificateNeed, now: DateTime<Utc>) -> bool {
        let waiting = need.next_attempt_at.is_some_and(|at| at > now);
        !waiting && need.not_after.is_none_or(|end| self.renewal_due(end))
    }

    fn builder(&self) -> Result<AccountBuilder, AcmeError> {
        let built = match &self.settings.ca_file {
            Some(path) => Account::builder_with_root(path),
            None => Account::builder(),
        };
        built.map_err(|source| AcmeError::Protocol { step: "client setup", domain: String::new(), source })
    }

    /// The account, created once per directory and kept (sealed) in the
    /// database; every replica uses the same one.
    async fn account(&self, domain: &str) -> Result<Account, AcmeError> {
        let mut cached = self.account.lock().await;
        if let Some(account) = cached.as_ref() {
            return Ok(account.clone());
        }
        let directory = &self.settings.directory_url;
        let protocol = |step| move |source| AcmeError::Protocol { step, domain: domain.to_owned(), source };
        let sealed = match self.store.acme_account(directory).await? {
            Some(sealed) => sealed,
            None => {
                let contact: Vec<&str> = self.settings.contact.iter().map(String::as_str).collect();
                let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
                let (_, credentials) = self
                    .builder()?
                    .create(&new, directory.clone(), None)
                    .await
                    .map_err(protocol("account creation"))?;
                let plain = serde_json::to_vec(&credentials).map_err(|e| AcmeError::Credentials(e.to_string()))?;
                // Another replica may have saved one first: everyone uses the kept one.
                self.store.save_acme_account(directory, &self.sealer.seal(&plain, directory)?).await?
            }
        };
        let plain = self.sealer.open(&sealed, directory)?;
        let credentials: AccountCredentials =
            serde_json::from_slice(&plain).map_err(|e| AcmeError::Credentials(e.to_string()))?;
        let account = self.builder()?.from_credentials(credentials).await.map_err(protocol("account"))?;
        *cached = Some(account.clone());
        Ok(account)
    }

    #[tracing::instrument(name = "certificates.order", skip_all, fields(domain = %domain), err)]
    async fn obtain(&self, domain: &str) -> Result<Issued, AcmeError> {
        let protocol = |step| move |source| AcmeError::Protocol { step, domain: domain.to_owned(), source };
        let account = self.account(domain).await?;
        let identifiers = [Identifier::Dns(domain.to_owned())];
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await.map_err(protocol("new order"))?;
        let challenge_ttl =
            chrono::Duration::from_std(self.settings.order_timeout * 2).unwrap_or(chrono::Duration::MAX);
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization.map_err(protocol("authorization"))?;
            match authorization.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(AcmeError::ChallengeFailed {
                        domain: domain.to_owned(),
                        detail: format!("the authorization is {other:?}"),
                    });
                }
            }
            let mut challenge = authorization.challenge(ChallengeType::Http01).ok_or_else(|| {
                AcmeError::ChallengeFailed { domain: domain.to_owned(), detail: "no http-01 challenge offered".into() }
            })?;
            let key_authorization = challenge.key_authorization();
            self.store.put_acme_challenge(&challenge.token, key_authorization.as_str(), domain, challenge_ttl).await?;
            challenge.set_ready().await.map_err(protocol("challenge"))?;
        }
        let retries = RetryPolicy::new().initial_delay(Duration::from_millis(250)).timeout(self.settings.order_timeout);
        let status = order.poll_ready(&retries).await.map_err(protocol("validation"))?;
        if status != OrderStatus::Ready {
            let detail = why_invalid(&mut order).await;
            return Err(AcmeError::ChallengeFailed { domain: domain.to_owned(), detail });
        }
        let key_pem = order.finalize().await.map_err(protocol("finalization"))?;
        let chain_pem = order.poll_certificate(&retries).await.map_err(protocol("issuance"))?;
        let not_after = leaf_not_after(&chain_pem)
            .map_err(|detail| AcmeError::BadCertificate { domain: domain.to_owned(), detail })?;
        Ok(Issued { chain_pem, key_pem, not_after })
    }
}

/// The CA's reasons an order became invalid (the challenges' problems).
async fn why_invalid(order: &mut Order) -> String {
    let mut reasons = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let Ok(mut authorization) = authorization else { continue };
        if let Ok(state) = authorization.refresh().await {
            reasons.extend(state.challenges.iter().filter_map(|c| c.error.as_ref()).map(|p| {
                p.detail.clone().unwrap_or_else(|| p.r#type.clone().unwrap_or_else(|| "no detail".to_owned()))
            }));
        }
    }
    if reasons.is_empty() { "the order became invalid".to_owned() } else { reasons.join("; ") }
}

/// The first certificate's end of validity.
pub fn leaf_not_after(chain_pem: &str) -> Result<DateTime<Utc>, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem.as_bytes()).map_err(|e| e.to_string())?;
    let leaf = pem.parse_x509().map_err(|e| e.to_string())?;
    DateTime::from_timestamp(leaf.validity().not_after.timestamp(), 0).ok_or_else(|| "no end of validity".to_owned())
}

/// `min * 2^failures`, at most `max`.
pub fn backoff(min: Duration, max: Duration, failures: u32) -> Duration {
    min.checked_mul(2u32.saturating_pow(failures.min(31))).map_or(max, |d| d.min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let (min, max) = (Duration::from_secs(60), Duration::from_secs(3600));
        let waits: Vec<u64> = (0..8).map(|f| backoff(min, max, f).as_secs()).collect();
        assert_eq!(waits, [60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(backoff(min, max, u32::MAX), max);
    }
}
