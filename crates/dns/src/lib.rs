//! DNS lookups for domain verification. [`TxtLookup`] is the narrow
//! interface the API uses; [`DnsResolver`] is the real one (hickory), either
//! with the system's configuration or with name servers given explicitly
//! (tests point it at a DNS server they run themselves).

use std::net::SocketAddr;

use async_trait::async_trait;
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::{ResolveError, TokioResolver};

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("the DNS lookup of {name} failed: {reason}")]
    Lookup { name: String, reason: String },
    #[error("the DNS resolver could not be set up: {0}")]
    Setup(String),
}

/// The TXT records at a name.
#[async_trait]
pub trait TxtLookup: Send + Sync + 'static {
    /// Every TXT record's strings joined (RFC 7208 style); an empty list when
    /// the name has no TXT records or does not exist.
    async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError>;
}

/// A real resolver, over UDP and TCP.
#[derive(Clone)]
pub struct DnsResolver {
    resolver: TokioResolver,
}

impl DnsResolver {
    /// With `/etc/resolv.conf`.
    pub fn system() -> Result<Self, DnsError> {
        let builder = TokioResolver::builder_tokio().map_err(|e| DnsError::Setup(e.to_string()))?;
        Ok(Self { resolver: builder.with_options(Self::options()).build() })
    }

    /// Asking only `servers`.
    pub fn with_servers(servers: &[SocketAddr]) -> Self {
        let mut group = NameServerConfigGroup::new();
        for server in servers {
            group.merge(NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true));
        }
        let config = ResolverConfig::from_parts(None, Vec::new(), group);
        let resolver = TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
            .with_options(Self::options())
            .build();
        Self { resolver }
    }

    fn options() -> ResolverOpts {
        let mut options = ResolverOpts::default();
        // A record just added must be seen on the next check, not in an hour.
        options.cache_size = 0;
        options.positive_max_ttl = Some(std::time::Duration::ZERO);
        options.negative_max_ttl = Some(std::time::Duration::ZERO);
        options.attempts = 2;
        options.timeout = std::time::Duration::from_secs(3);
        options
    }
}

#[async_trait]
impl TxtLookup for DnsResolver {
    async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        // Fully qualified: no search domains appended.
        let fqdn = if name.ends_with('.') { name.to_owned() } else { format!("{name}.") };
        match self.resolver.txt_lookup(fqdn.as_str()).await {
            Ok(lookup) => Ok(lookup
                .iter()
                .map(|txt| txt.iter().map(|part| String::from_utf8_lossy(part)).collect::<String>())
                .collect()),
            Err(error) if absent(&error) => Ok(Vec::new()),
            Err(error) => Err(DnsError::Lookup { name: name.to_owned(), reason: error.to_string() }),
        }
    }
}

fn absent(error: &ResolveError) -> bool {
    error.is_no_records_found() || error.is_nx_domain()
}
