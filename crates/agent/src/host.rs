//! The node's real CPU and memory use, from `/proc` (which shows the host's
//! figures inside a container too).

use std::sync::Mutex;

/// CPU time counters from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CpuTimes {
    busy: u64,
    total: u64,
}

fn parse_cpu_line(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().next()?;
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let values: Vec<u64> = fields.take(8).filter_map(|v| v.parse().ok()).collect();
    if values.len() < 5 {
        return None;
    }
    let total: u64 = values.iter().sum();
    // idle and iowait are not busy.
    let idle = values[3] + values[4];
    Some(CpuTimes { busy: total - idle, total })
}

/// `MemTotal - MemAvailable` in bytes.
fn parse_used_memory(meminfo: &str) -> Option<i64> {
    let field = |name: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<i64>().ok())
    };
    Some((field("MemTotal:")? - field("MemAvailable:")?) * 1024)
}

/// Samples host usage; CPU use is the average since the previous sample.
#[derive(Debug, Default)]
pub struct HostUsage {
    last: Mutex<Option<CpuTimes>>,
}

impl HostUsage {
    /// (CPU in thousandths of a core, memory in bytes) used on the host.
    pub fn sample(&self, cpus: i64) -> (i64, i64) {
        let memory = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| parse_used_memory(&m)).unwrap_or(0);
        let now = std::fs::read_to_string("/proc/stat").ok().and_then(|s| parse_cpu_line(&s));
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let cpu = match (*last, now) {
            (Some(before), Some(after)) if after.total > before.total => {
                let busy = after.busy.saturating_sub(before.busy) as f64;
                let total = (after.total - before.total) as f64;
                (busy / total * cpus as f64 * 1000.0).round() as i64
            }
            _ => 0,
        };
        *last = now;
        (cpu, memory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_parsed() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4 5\n";
        assert_eq!(parse_cpu_line(stat), Some(CpuTimes { busy: 150, total: 1000 }));
        let meminfo = "MemTotal:       2048 kB\nMemFree:         100 kB\nMemAvailable:    1024 kB\n";
        assert_eq!(parse_used_memory(meminfo), Some(1024 * 1024));
        assert_eq!(parse_cpu_line("intr 1 2 3"), None);
    }

    #[test]
    fn sampling_this_host_gives_plausible_figures() {
        let usage = HostUsage::default();
        let _ = usage.sample(2);
        let mut spin = 0u64;
        for i in 0..3_000_000u64 {
            spin = spin.wrapping_add(i * i);
        }
        std::hint::black_box(spin);
        let (cpu, memory) = usage.sample(2);
        assert!((0..=2000).contains(&cpu), "{cpu}");
        assert!(memory > 0);
    }
}
