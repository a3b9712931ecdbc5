//! Custom domains: GetDomainStatus and VerifyDomain. A domain outside the
//! platform's own is routed only after the deployment's owner publishes the
//! token given here as a DNS TXT record (bound to the deployment and the
//! domain, expiring), checked through [`TxtLookup`].

use std::sync::Arc;

use axum::extract::State;
use chrono::Utc;
use connectrpc_axum::ConnectRequest;
use flotilla_dns::TxtLookup;
use flotilla_proto::v1 as pb;
use flotilla_store::domains::{CertificateStatus, DomainVerification};
use flotilla_types::domains::{is_platform_domain, records_prove, verification_record_name, verification_record_value};
use flotilla_types::{DeploymentId, Hostname};
use rand::Rng;

use crate::auth::Caller;
use crate::convert::{parse_id, timestamp};
use crate::deployments::{live_deployment, require_mutation};
use crate::{ApiError, ApiState};

type Reply<T> = Result<connectrpc_axum::ConnectResponse<T>, connectrpc_axum::ConnectError>;

/// What the API needs to prove domains.
#[derive(Clone)]
pub struct DomainAccess {
    pub dns: Arc<dyn TxtLookup>,
    /// How long a token may wait to be published.
    pub token_ttl: chrono::Duration,
    pub platform_domains: Vec<Hostname>,
    /// The ports users reach the edge's HTTP and HTTPS on.
    pub edge_ports: (u16, u16),
}

impl std::fmt::Debug for DomainAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainAccess")
            .field("token_ttl", &self.token_ttl)
            .field("platform_domains", &self.platform_domains)
            .finish_non_exhaustive()
    }
}

impl DomainAccess {
    fn needs_proof(&self, domain: &Hostname) -> bool {
        self.needs_proof_of(domain.as_str())
    }

    /// The URL users reach a route at.
    pub fn url(&self, tls: bool, domain: &str, path_prefix: &str) -> String {
        edge_url(self.edge_ports, tls, domain, path_prefix)
    }

    /// Whether `domain` is routed only once its deployment proves it.
    pub fn needs_proof_of(&self, domain: &str) -> bool {
        !is_platform_domain(&self.platform_domains, domain)
    }
}

/// `scheme://domain[:port][path]`: the port only when it is not the scheme's.
fn edge_url(ports: (u16, u16), tls: bool, domain: &str, path_prefix: &str) -> String {
    let (scheme, port, default) = if tls { ("https", ports.1, 443) } else { ("http", ports.0, 80) };
    let port = if port == default { String::new() } else { format!(":{port}") };
    let path = if path_prefix == "/" { "" } else { path_prefix };
    format!("{scheme}://{domain}{port}{path}")
}

/// A fresh token: 160 random bits, lowercase hex.
fn new_token() -> String {
    let bytes: [u8; 20] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn domain_of(api: &ApiState, caller: &Caller, id: &str) -> Result<(DeploymentId, Hostname), ApiError> {
    let deployment = live_deployment(api, caller, parse_id("id", id)?).await?.deployment;
    let domain = deployment.spec.domain.clone().ok_or_else(|| {
        ApiError::FailedPrecondition("the deployment has no domain: set one with UpdateRoutings first".to_owned())
    })?;
    Ok((deployment.id, domain))
}

async fn status(
    api: &ApiState,
    caller: &Caller,
    deployment: DeploymentId,
    domain: &Hostname,
    verification: Option<DomainVerification>,
) -> Result<pb::GetDomainStatusResponse, ApiError> {
    let access = &api.domains;
    let tenant = api.store.tenant(caller.organization_id);
    let now = Utc::now();
    let mut answer = pb::GetDomainStatusResponse { domain: domain.to_string(), ..Default::default() };
    let state = if !access.needs_proof(domain) {
        pb::DomainVerification::NotRequired
    } else {
        answer.txt_name = verification_record_name(domain);
        match &verification {
            None => pb::DomainVerification::NotRequested,
            Some(v) => {
                answer.txt_value = verification_record_value(&v.token);
                answer.token_expires_at = Some(timestamp(v.expires_at));
                answer.verified_at = v.verified_at.map(timestamp);
                answer.last_check_error = v.last_error.clone().unwrap_or_default();
                match (v.verified_at, v.pending(now)) {
                    (Some(_), _) => pb::DomainVerification::Verified,
                    (None, true) => pb::DomainVerification::Pending,
                    (None, false) => pb::DomainVerification::Expired,
                }
            }
        }
    };
    answer.set_verification(state);
    answer.routed = matches!(state, pb::DomainVerification::NotRequired | pb::DomainVerification::Verified);
    let certificate = tenant.certificate_status(deployment, domain.as_str()).await?;
    certificate_fields(&mut answer, certificate);
    Ok(answer)
}

fn certificate_fields(answer: &mut pb::GetDomainStatusResponse, certificate: Option<CertificateStatus>) {
    let Some(c) = certificate else {
        answer.set_certificate(pb::CertificateState::None);
        return;
    };
    answer.set_certificate(match c.status.as_str() {
        "issued" => pb::CertificateState::Issued,
        "failed" => pb::CertificateState::Failed,
        _ => pb::CertificateState::Pending,
    });
    answer.certificate_not_after = c.not_after.map(timestamp);
    answer.certificate_error = c.last_error.unwrap_or_default();
    answer.certificate_failures = u32::try_from(c.failures).unwrap_or_default();
    if c.failures > 0 {
        answer.certificate_next_attempt_at = Some(timestamp(c.next_attempt_at));
    }
}

pub async fn get_domain_status(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::GetDomainStatusRequest>,
) -> Reply<pb::GetDomainStatusResponse> {
    api.observe("GetDomainStatus", async {
        let (deployment, domain) = domain_of(&api, &caller, &request.id).await?;
        let verification =
            api.store.tenant(caller.organization_id).domain_verification(deployment, domain.as_str()).await?;
        status(&api, &caller, deployment, &domain, verification).await
    })
    .await
}

pub async fn verify_domain(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::VerifyDomainRequest>,
) -> Reply<pb::GetDomainStatusResponse> {
    let target = request.id.clone();
    api.audited("VerifyDomain", &caller, &target, async {
        require_mutation(&caller)?;
        let (deployment, domain) = domain_of(&api, &caller, &request.id).await?;
        if !api.domains.needs_proof(&domain) {
            return status(&api, &caller, deployment, &domain, None).await;
        }
        let tenant = api.store.tenant(caller.organization_id);
        let existing = tenant.domain_verification(deployment, domain.as_str()).await?;
        let now = Utc::now();
        let verification = match existing {
            Some(v) if v.verified_at.is_some() => v,
            // A token in force is checked; none (or an expired one) gets a new
            // token, which cannot have been published yet.
            Some(v) if v.pending(now) => {
                let name = verification_record_name(&domain);
                let error = match api.domains.dns.txt(&name).await {
                    Ok(records) if records_prove(&records, &v.token) => None,
                    Ok(records) if records.is_empty() => Some(format!("no TXT record at {name} yet")),
                    Ok(records) => Some(format!(
                        "the TXT records at {name} do not hold the token: found {}",
                        records.iter().map(|r| format!("{r:?}")).collect::<Vec<_>>().join(", ")
                    )),
                    Err(error) => Some(error.to_string()),
                };
                let checked =
                    tenant.record_domain_check(deployment, domain.as_str(), &v.token, error.as_deref()).await?;
                if checked.verified_at.is_some() {
                    tracing::info!(deployment.id = %deployment, domain = %domain, "custom domain verified");
                }
                checked
            }
            _ => tenant.issue_domain_token(deployment, domain.as_str(), &new_token(), api.domains.token_ttl).await?,
        };
        status(&api, &caller, deployment, &domain, Some(verification)).await
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::edge_url;

    #[test]
    fn urls_name_the_edge_s_port_only_when_it_is_not_the_scheme_s() {
        assert_eq!(edge_url((80, 443), false, "web.example.com", "/"), "http://web.example.com");
        assert_eq!(edge_url((80, 443), true, "web.example.com", "/api"), "https://web.example.com/api");
        assert_eq!(edge_url((7880, 7843), false, "hello.localhost", "/"), "http://hello.localhost:7880");
        assert_eq!(edge_url((7880, 7843), true, "hello.localhost", "/"), "https://hello.localhost:7843");
    }
}
