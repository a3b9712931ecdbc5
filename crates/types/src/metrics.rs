//! Container metrics: raw counters as read from cgroups or the Docker API,
//! samples with exact per-interval deltas, and minute aggregates whose byte
//! sums add up exactly (no window overlaps another, none is skipped).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::{DeploymentId, OrganizationId};

/// One reading of a container's counters. CPU, network and block I/O are
/// cumulative since the container (re)started; memory and PIDs are levels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawCounters {
    pub cpu_usage_ns: u64,
    /// Working set: usage minus inactive page cache (what `docker stats` shows).
    pub memory_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub blk_read_bytes: u64,
    pub blk_write_bytes: u64,
    pub pids: u64,
}

/// What a sample is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SampleKey {
    pub container_id: String,
    pub deployment_id: DeploymentId,
    pub organization_id: Option<OrganizationId>,
    pub replica_index: i32,
}

/// One container over one collection interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub key: SampleKey,
    /// End of the interval, milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// Length of the interval the deltas cover.
    pub interval_ms: i64,
    /// CPU in cores (1.0 = one core busy for the whole interval).
    pub cpu_cores: f64,
    /// CPU as a percentage of the container's limit (of the host's cores
    /// when it has none).
    pub cpu_percent_of_limit: f64,
    pub memory_bytes: u64,
    /// 0 when unlimited.
    pub memory_limit_bytes: u64,
    /// Bytes in this interval (deltas, never negative).
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub blk_read_bytes: u64,
    pub blk_write_bytes: u64,
    pub pids: u64,
}

/// Limits used to turn counters into percentages.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// 0.0 when unlimited.
    pub cpu_cores: f64,
    /// 0 when unlimited.
    pub memory_bytes: u64,
    /// The host's cores, for containers without a CPU limit.
    pub host_cores: f64,
}

#[derive(Debug, Clone)]
struct LastReading {
    /// Tells a restarted container (its counters start again at zero) apart.
    incarnation: String,
    counters: RawCounters,
    time_ms: i64,
}

/// Turns cumulative counters into exact per-interval deltas. The first
/// reading of a container only sets the baseline. When the container was
/// restarted (its incarnation changed) or a counter went down, the counters
/// started again from zero: the delta is the new value, never negative and
/// never counted twice.
#[derive(Debug, Default)]
pub struct DeltaTracker {
    last: HashMap<String, LastReading>,
}

fn delta(old: u64, new: u64, reset: bool) -> u64 {
    if reset || new < old { new } else { new - old }
}

impl DeltaTracker {
    /// The sample for the interval ending at `time_ms`, or `None` for a
    /// container seen for the first time.
    pub fn observe(
        &mut self,
        key: &SampleKey,
        incarnation: &str,
        counters: RawCounters,
        limits: Limits,
        time_ms: i64,
    ) -> Option<Sample> {
        let previous = self
            .last
            .insert(key.container_id.clone(), LastReading { incarnation: incarnation.to_owned(), counters, time_ms })?;
        let interval_ms = time_ms - previous.time_ms;
        if interval_ms <= 0 {
            return None;
        }
        let reset = previous.incarnation != incarnation;
        let old = previous.counters;
        let cpu_ns = delta(old.cpu_usage_ns, counters.cpu_usage_ns, reset);
        let cpu_cores = cpu_ns as f64 / (interval_ms as f64 * 1_000_000.0);
        let limit = if limits.cpu_cores > 0.0 { limits.cpu_cores } else { limits.host_cores.max(1.0) };
        Some(Sample {
            key: key.clone(),
            time_ms,
            interval_ms,
            cpu_cores,
            cpu_percent_of_limit: cpu_cores / limit * 100.0,
            memory_bytes: counters.memory_bytes,
            memory_limit_bytes: limits.memory_bytes,
            net_rx_bytes: delta(old.net_rx_bytes, counters.net_rx_bytes, reset),
            net_tx_bytes: delta(old.net_tx_bytes, counters.net_tx_bytes, reset),
            blk_read_bytes: delta(old.blk_read_bytes, counters.blk_read_bytes, reset),
            blk_write_bytes: delta(old.blk_write_bytes, counters.blk_write_bytes, reset),
            pids: counters.pids,
        })
    }

    /// Forgets containers not in `alive`.
    pub fn retain(&mut self, alive: impl Fn(&str) -> bool) {
        self.last.retain(|id, _| alive(id));
    }

    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

/// One container over one minute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MinuteAggregate {
    pub key: SampleKey,
    /// Start of the minute, milliseconds since the Unix epoch.
    pub minute_ms: i64,
    pub samples: u32,
    pub cpu_avg_cores: f64,
    pub cpu_max_cores: f64,
    pub memory_avg_bytes: u64,
    pub memory_max_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub blk_read_bytes: u64,
    pub blk_write_bytes: u64,
}

const MINUTE_MS: i64 = 60_000;

/// The minute a sample belongs to: the one containing the end of its interval.
pub fn minute_of(time_ms: i64) -> i64 {
    time_ms.div_euclid(MINUTE_MS) * MINUTE_MS
}

#[derive(Debug, Clone)]
struct Window {
    minute_ms: i64,
    key: SampleKey,
    samples: u32,
    cpu_sum: f64,
    cpu_max: f64,
    memory_sum: u128,
    memory_max: u64,
    net_rx: u64,
    net_tx: u64,
    blk_read: u64,
    blk_write: u64,
}

impl Window {
    fn new(key: SampleKey, minute_ms: i64) -> Self {
        Self {
            minute_ms,
            key,
            samples: 0,
            cpu_sum: 0.0,
            cpu_max: 0.0,
            memory_sum: 0,
            memory_max: 0,
            net_rx: 0,
            net_tx: 0,
            blk_read: 0,
            blk_write: 0,
        }
    }

    fn add(&mut self, s: &Sample) {
        self.samples += 1;
        self.cpu_sum += s.cpu_cores;
        self.cpu_max = self.cpu_max.max(s.cpu_cores);
        self.memory_sum += u128::from(s.memory_bytes);
        self.memory_max = self.memory_max.max(s.memory_bytes);
        self.net_rx += s.net_rx_bytes;
        self.net_tx += s.net_tx_bytes;
        self.blk_read += s.blk_read_bytes;
        self.blk_write += s.blk_write_bytes;
    }

    fn finish(self) -> MinuteAggregate {
        let n = f64::from(self.samples.max(1));
        MinuteAggregate {
            key: self.key,
            minute_ms: self.minute_ms,
            samples: self.samples,
            cpu_avg_cores: self.cpu_sum / n,
            cpu_max_cores: self.cpu_max,
            memory_avg_bytes: (self.memory_sum / u128::from(self.samples.max(1))) as u64,
            memory_max_bytes: self.memory_max,
            net_rx_bytes: self.net_rx,
            net_tx_bytes: self.net_tx,
            blk_read_bytes: self.blk_read,
            blk_write_bytes: self.blk_write,
        }
    }
}

/// Folds samples into per-container minute aggregates. Every sample goes to
/// exactly one minute (the one its interval ends in), so the byte sums of
/// consecutive minutes add up to the counters' difference exactly.
#[derive(Debug, Default)]
pub struct MinuteAggregator {
    open: HashMap<String, Window>,
}

impl MinuteAggregator {
    /// Adds a sample; returns the container's previous minute if this sample
    /// starts a new one.
    pub fn add(&mut self, sample: &Sample) -> Option<MinuteAggregate> {
        let minute = minute_of(sample.time_ms);
        let window =
            self.open.entry(sample.key.container_id.clone()).or_insert_with(|| Window::new(sample.key.clone(), minute));
        let finished = if window.minute_ms < minute {
            let old = std::mem::replace(window, Window::new(sample.key.clone(), minute));
            Some(old.finish())
        } else {
            None
        };
        window.add(sample);
        finished
    }

    /// Closes every minute that ended before `now_ms - grace_ms` (containers
    /// that stopped sending, and minutes whose last sample came in already).
    pub fn flush_due(&mut self, now_ms: i64, grace_ms: i64) -> Vec<MinuteAggregate> {
        let due: Vec<String> = self
            .open
            .iter()
            .filter(|(_, w)| w.minute_ms + MINUTE_MS + grace_ms <= now_ms)
            .map(|(id, _)| id.clone())
            .collect();
        due.into_iter().filter_map(|id| self.open.remove(&id)).map(Window::finish).collect()
    }

    /// Closes everything (shutdown).
    pub fn flush_all(&mut self) -> Vec<MinuteAggregate> {
        self.open.drain().map(|(_, w)| w.finish()).collect()
    }

    pub fn open_windows(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> SampleKey {
        SampleKey {
            container_id: id.into(),
            deployment_id: DeploymentId(uuid::Uuid::nil()),
            organization_id: None,
            replica_index: 0,
        }
    }

    fn counters(cpu: u64, rx: u64) -> RawCounters {
        RawCounters { cpu_usage_ns: cpu, memory_bytes: 1000, net_rx_bytes: rx, ..RawCounters::default() }
    }

    const LIMITS: Limits = Limits { cpu_cores: 0.5, memory_bytes: 0, host_cores: 2.0 };

    #[test]
    fn deltas_are_exact_and_the_first_reading_is_a_baseline() {
        let mut tracker = DeltaTracker::default();
        let k = key("c");
        assert!(tracker.observe(&k, "a", counters(1_000_000_000, 100), LIMITS, 10_000).is_none());
        let s = tracker.observe(&k, "a", counters(3_500_000_000, 600), LIMITS, 15_000).unwrap();
        assert_eq!(s.interval_ms, 5_000);
        assert!((s.cpu_cores - 0.5).abs() < 1e-9, "2.5 s of CPU in 5 s");
        assert!((s.cpu_percent_of_limit - 100.0).abs() < 1e-9, "half a core of a half-core limit");
        assert_eq!(s.net_rx_bytes, 500);
    }

    #[test]
    fn a_restart_never_gives_a_negative_or_doubled_delta() {
        let mut tracker = DeltaTracker::default();
        let k = key("c");
        tracker.observe(&k, "start-1", counters(9_000, 9_000), LIMITS, 0);
        // Restarted: the counters began again from zero.
        let s = tracker.observe(&k, "start-2", counters(300, 300), LIMITS, 5_000).unwrap();
        assert_eq!(s.net_rx_bytes, 300);
        // Restarted and already past the old value: still only what is new.
        tracker.observe(&k, "start-3", counters(50_000, 50_000), LIMITS, 10_000);
        let s = tracker.observe(&k, "start-3", counters(50_500, 50_500), LIMITS, 15_000).unwrap();
        assert_eq!(s.net_rx_bytes, 500);
        // A counter going down without a known restart is a reset too.
        let s = tracker.observe(&k, "start-3", counters(40, 40), LIMITS, 20_000).unwrap();
        assert_eq!(s.net_rx_bytes, 40);
    }

    #[test]
    fn minute_sums_add_up_to_the_counter_difference() {
        let mut tracker = DeltaTracker::default();
        let mut aggregator = MinuteAggregator::default();
        let k = key("c");
        let mut rx: u64 = 12_345;
        let mut t: i64 = 59_000; // starts just before a minute boundary
        let first = rx;
        tracker.observe(&k, "a", counters(0, rx), LIMITS, t);
        let mut minutes = Vec::new();
        // Irregular intervals, as when collection stretches under load.
        for step in 0..200 {
            t += [5_000, 5_000, 7_000, 3_000, 11_000][step % 5];
            rx += (step as u64 * 997) % 10_000;
            let sample = tracker.observe(&k, "a", counters(0, rx), LIMITS, t).unwrap();
            minutes.extend(aggregator.add(&sample));
        }
        minutes.extend(aggregator.flush_all());
        let total: u64 = minutes.iter().map(|m| m.net_rx_bytes).sum();
        assert_eq!(total, rx - first, "no overlap, no gap");
        let mut starts: Vec<i64> = minutes.iter().map(|m| m.minute_ms).collect();
        starts.sort();
        starts.dedup();
        assert_eq!(starts.len(), minutes.len(), "each minute once");
        assert!(minutes.iter().all(|m| m.minute_ms % 60_000 == 0));
    }

    #[test]
    fn averages_and_maxima() {
        let mut aggregator = MinuteAggregator::default();
        let k = key("c");
        let sample = |t: i64, cpu: f64, mem: u64| Sample {
            key: k.clone(),
            time_ms: t,
            interval_ms: 5_000,
            cpu_cores: cpu,
            cpu_percent_of_limit: 0.0,
            memory_bytes: mem,
            memory_limit_bytes: 0,
            net_rx_bytes: 1,
            net_tx_bytes: 2,
            blk_read_bytes: 3,
            blk_write_bytes: 4,
            pids: 1,
        };
        assert!(aggregator.add(&sample(60_000, 0.2, 100)).is_none());
        assert!(aggregator.add(&sample(65_000, 0.6, 300)).is_none());
        let minute = aggregator.add(&sample(120_000, 1.0, 50)).expect("the first minute closes");
        assert_eq!(minute.minute_ms, 60_000);
        assert_eq!(minute.samples, 2);
        assert!((minute.cpu_avg_cores - 0.4).abs() < 1e-9);
        assert!((minute.cpu_max_cores - 0.6).abs() < 1e-9);
        assert_eq!((minute.memory_avg_bytes, minute.memory_max_bytes), (200, 300));
        assert_eq!((minute.net_rx_bytes, minute.blk_write_bytes), (2, 8));
        // The open minute closes once it is over and the grace has passed.
        assert!(aggregator.flush_due(180_000 - 1, 0).is_empty());
        assert_eq!(aggregator.flush_due(185_000, 5_000).len(), 1);
    }
}
