//! Traefik's static configuration for one machine: the shipped
//! `traefik/traefik.toml` with only what a single machine must change
//! (loopback addresses, the route table's URL, no Swarm provider, files for
//! logs). The quickstart runs Traefik with it (`flotillad traefik-config`),
//! and so do the tests: both run the shipped configuration, not a copy.

use serde_json::{Value, json};

/// The shipped static configuration.
pub const SHIPPED: &str = include_str!("../../../traefik/traefik.toml");

/// What differs from the shipped configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTraefik {
    /// Listen addresses (`host:port`) of the `web`, `websecure` and
    /// `traefik` (ping, metrics, API) entry points.
    pub web: String,
    pub websecure: String,
    pub internal: String,
    /// The route table's URL, with `?wait=N` for long polls.
    pub route_table: String,
    /// How this proxy names itself to the route table.
    pub name: String,
    /// The cluster's internal token (the table then carries certificates).
    pub internal_token: Option<String>,
    /// Overrides the shipped pollInterval.
    pub poll_interval: Option<String>,
    /// The `platform` ACME resolver's directory and storage file; without
    /// it the resolver is left out.
    pub acme: Option<(String, String)>,
    /// The file provider's directory (none: left out).
    pub file_provider: Option<String>,
    /// Traefik's API on the `traefik` entry point (for tests; never exposed).
    pub api: bool,
    /// Where Traefik writes its log and access log (none: stdout, and no
    /// access log).
    pub log_file: Option<String>,
    pub access_log_file: Option<String>,
}

impl LocalTraefik {
    /// Loopback entry points on `port` (web), `port + 1` (websecure) and
    /// `port + 2` (traefik), polling `route_table`.
    pub fn on_loopback(port: u16, route_table: &str, name: &str) -> Self {
        Self {
            web: format!("127.0.0.1:{port}"),
            websecure: format!("127.0.0.1:{}", port + 1),
            internal: format!("127.0.0.1:{}", port + 2),
            route_table: route_table.to_owned(),
            name: name.to_owned(),
            internal_token: None,
            poll_interval: None,
            acme: None,
            file_provider: None,
            api: false,
            log_file: None,
            access_log_file: None,
        }
    }

    /// The configuration as JSON (YAML is a superset of JSON: write it to a
    /// `.yaml` file for Traefik's `--configFile`).
    pub fn render(&self) -> Value {
        let shipped: toml::Value = toml::from_str(SHIPPED).expect("traefik/traefik.toml is TOML");
        let mut config = serde_json::to_value(shipped).expect("TOML converts to JSON");
        config["entryPoints"]["web"]["address"] = json!(self.web);
        config["entryPoints"]["websecure"]["address"] = json!(self.websecure);
        config["entryPoints"]["traefik"]["address"] = json!(self.internal);
        let provider = &mut config["providers"]["http"];
        provider["endpoint"] = json!(self.route_table);
        if let Some(interval) = &self.poll_interval {
            provider["pollInterval"] = json!(interval);
        }
        let headers = &mut provider["headers"];
        headers["Flotilla-Edge"] = json!(self.name);
        match &self.internal_token {
            Some(token) => headers["Authorization"] = json!(format!("Bearer {token}")),
            None => {
                if let Some(headers) = headers.as_object_mut() {
                    headers.remove("Authorization");
                }
            }
        }
        if let Some(providers) = config["providers"].as_object_mut() {
            providers.remove("swarm");
            if self.file_provider.is_none() {
                providers.remove("file");
            }
        }
        if let Some(directory) = &self.file_provider {
            config["providers"]["file"]["directory"] = json!(directory);
        }
        match &self.acme {
            Some((directory, storage)) => {
                let acme = &mut config["certificatesResolvers"]["platform"]["acme"];
                acme["caServer"] = json!(directory);
                acme["storage"] = json!(storage);
            }
            None => {
                if let Some(config) = config.as_object_mut() {
                    config.remove("certificatesResolvers");
                }
            }
        }
        if let Some(file) = &self.log_file {
            config["log"]["filePath"] = json!(file);
        }
        match &self.access_log_file {
            Some(file) => {
                config["accessLog"]["filePath"] = json!(file);
                // Each request as it ends: tests and operators read it live.
                config["accessLog"]["bufferingSize"] = json!(0);
            }
            None => {
                if let Some(config) = config.as_object_mut() {
                    config.remove("accessLog");
                }
            }
        }
        if self.api {
            config["api"] = json!({ "insecure": true, "dashboard": false });
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_configuration_with_loopback_ports_and_the_route_table() {
        let mut local = LocalTraefik::on_loopback(7880, "http://127.0.0.1:7800/traefik/dynamic?wait=5", "quickstart");
        let config = local.render();
        assert_eq!(config["entryPoints"]["web"]["address"], "127.0.0.1:7880");
        assert_eq!(config["entryPoints"]["traefik"]["address"], "127.0.0.1:7882");
        let http = &config["providers"]["http"];
        assert_eq!(http["endpoint"], "http://127.0.0.1:7800/traefik/dynamic?wait=5");
        assert_eq!(http["headers"]["Flotilla-Edge"], "quickstart");
        assert!(http["headers"].get("Authorization").is_none(), "no token: no placeholder sent");
        assert_eq!(config["providers"]["providersThrottleDuration"], "0s", "as shipped");
        assert!(config["providers"].get("swarm").is_none() && config["providers"].get("file").is_none());
        assert!(config.get("certificatesResolvers").is_none());

        local.internal_token = Some("s3cret".into());
        local.acme = Some(("https://127.0.0.1:14000/dir".into(), "/tmp/acme.json".into()));
        let config = local.render();
        assert_eq!(config["providers"]["http"]["headers"]["Authorization"], "Bearer s3cret");
        assert_eq!(config["certificatesResolvers"]["platform"]["acme"]["caServer"], "https://127.0.0.1:14000/dir");
    }
}
