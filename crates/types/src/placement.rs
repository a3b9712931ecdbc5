//! Placement vocabulary shared by the API (validation), the store
//! (persistence) and the orchestrator (selection): strategies and label
//! constraints.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::validate::FieldError;

/// How the orchestrator picks a node for a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlacementStrategy {
    /// Fewest deployments, then lowest CPU use.
    LeastLoaded,
    /// The next eligible node after the last one chosen, by node id.
    RoundRobin,
    /// Resource-based, filling the fullest node that fits first.
    Binpack,
    /// Resource-based, choosing the node with the most free CPU, memory and slots.
    Spread,
}

impl PlacementStrategy {
    pub const ALL: [Self; 4] = [Self::LeastLoaded, Self::RoundRobin, Self::Binpack, Self::Spread];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::LeastLoaded => "least-loaded",
            Self::RoundRobin => "round-robin",
            Self::Binpack => "binpack",
            Self::Spread => "spread",
        }
    }

    /// Parses a strategy; `resource-based` is spread, its default flavour.
    pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
        match value {
            "least-loaded" => Ok(Self::LeastLoaded),
            "round-robin" => Ok(Self::RoundRobin),
            "binpack" | "resource-based-binpack" => Ok(Self::Binpack),
            "spread" | "resource-based" | "resource-based-spread" => Ok(Self::Spread),
            other => Err(FieldError::new(
                field,
                format!("unknown strategy {other:?}: use least-loaded, round-robin, binpack or spread"),
            )),
        }
    }
}

impl fmt::Display for PlacementStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PlacementStrategy {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse("strategy", s)
    }
}

/// What happens to a replica whose node is lost: powered off, or cut off
/// from the cluster (a partition looks the same from outside).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeLoss {
    /// At most one copy runs: a node cut off from the control database and
    /// from most other nodes stops its copy (it fences itself), and the
    /// replacement starts only once that has surely happened. Safe for apps
    /// with side effects (jobs, consumers, anything not idempotent); the
    /// replica is away a few seconds longer.
    #[default]
    Fence,
    /// The replacement starts as soon as the node is down; a copy on a node
    /// that was only cut off runs on until the node returns (then it is
    /// removed). The fastest recovery, for stateless web apps.
    Replace,
}

impl NodeLoss {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fence => "fence",
            Self::Replace => "replace",
        }
    }

    pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
        match value {
            "fence" => Ok(Self::Fence),
            "replace" => Ok(Self::Replace),
            other => Err(FieldError::new(field, format!("unknown node loss policy {other:?}: use fence or replace"))),
        }
    }
}

impl fmt::Display for NodeLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Node labels a replica's node must carry, each with this exact value
/// (`compute=true`, `region=eu`).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Constraints(BTreeMap<String, String>);

impl Constraints {
    pub const MAX: usize = 16;

    pub const fn empty() -> Self {
        Self(BTreeMap::new())
    }

    /// Validates keys (1-63 of `a-z`, `0-9`, `.`, `-`, `_`, `/`) and values
    /// (0-63 of the same and upper case letters), as Docker node labels are
    /// commonly written.
    pub fn parse(field: &str, pairs: &BTreeMap<String, String>) -> Result<Self, FieldError> {
        if pairs.len() > Self::MAX {
            return Err(FieldError::new(field, format!("at most {} constraints", Self::MAX)));
        }
        for (key, value) in pairs {
            let key_ok = !key.is_empty()
                && key.len() <= 63
                && key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-_/".contains(&b));
            if !key_ok {
                return Err(FieldError::new(
                    format!("{field}.{key}"),
                    "a label key is 1-63 of a-z, 0-9, '.', '-', '_' and '/'",
                ));
            }
            let value_ok =
                value.len() <= 63 && value.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_/".contains(&b));
            if !value_ok {
                return Err(FieldError::new(
                    format!("{field}.{key}"),
                    "a label value is 0-63 of letters, digits, '.', '-', '_' and '/'",
                ));
            }
        }
        Ok(Self(pairs.clone()))
    }

    /// Whether a node with these labels satisfies every constraint.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

impl fmt::Display for Constraints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (k, v) in &self.0 {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn strategies_round_trip_and_aliases() {
        for s in PlacementStrategy::ALL {
            assert_eq!(PlacementStrategy::parse("s", s.as_str()), Ok(s));
        }
        assert_eq!(PlacementStrategy::parse("s", "resource-based"), Ok(PlacementStrategy::Spread));
        let err = PlacementStrategy::parse("placement.strategy", "fastest").unwrap_err();
        assert_eq!(err.field, "placement.strategy");
        assert!(err.reason.contains("least-loaded"), "{}", err.reason);
    }

    #[test]
    fn constraints_match_exactly() {
        let c = Constraints::parse("c", &map(&[("compute", "true"), ("region", "eu")])).unwrap();
        assert!(c.matches(&map(&[("compute", "true"), ("region", "eu"), ("disk", "ssd")])));
        assert!(!c.matches(&map(&[("compute", "true"), ("region", "us")])));
        assert!(!c.matches(&map(&[("compute", "true")])));
        assert!(Constraints::default().matches(&BTreeMap::new()));
        assert_eq!(c.to_string(), "compute=true,region=eu");
    }

    #[test]
    fn hostile_constraints_are_refused() {
        for (k, v) in [("", "x"), ("Region", "eu"), ("a b", "x"), ("k", "a`b"), ("k", "x y"), ("k", "a\nb")] {
            let err = Constraints::parse("constraints", &map(&[(k, v)]));
            assert!(err.is_err(), "{k:?}={v:?} accepted");
        }
        let many: BTreeMap<String, String> = (0..17).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        assert!(Constraints::parse("c", &many).is_err());
    }
}
