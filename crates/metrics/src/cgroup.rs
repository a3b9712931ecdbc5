//! The fast path: a container's counters read straight from its cgroup files
//! (v1 or v2, cgroupfs or systemd layout) and its network namespace's
//! counters from `/proc/<pid>/net/dev`. No call to the engine.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use flotilla_types::metrics::RawCounters;

/// Which cgroup hierarchy the host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    V1,
    V2,
}

/// Reads container counters from a cgroup filesystem mounted at `root`
/// (the host's `/sys/fs/cgroup`, mounted read-only into the agent's
/// container in a cluster) and a `/proc` at `proc_root`.
#[derive(Debug, Clone)]
pub struct CgroupReader {
    root: PathBuf,
    proc_root: PathBuf,
    version: CgroupVersion,
}

impl CgroupReader {
    /// Looks at `root` to tell the hierarchy; `None` when it is not a cgroup
    /// filesystem this reader understands.
    pub fn detect(root: &Path, proc_root: &Path) -> Option<Self> {
        let version = if root.join("cgroup.controllers").exists() {
            CgroupVersion::V2
        } else if root.join("memory").is_dir() && root.join("pids").is_dir() {
            CgroupVersion::V1
        } else {
            return None;
        };
        Some(Self { root: root.to_owned(), proc_root: proc_root.to_owned(), version })
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The container's directory under `base`: cgroupfs (`docker/<id>`) or
    /// systemd (`system.slice/docker-<id>.scope`) layout.
    fn container_dir(&self, base: &Path, id: &str) -> io::Result<PathBuf> {
        let candidates = [base.join("docker").join(id), base.join("system.slice").join(format!("docker-{id}.scope"))];
        candidates.into_iter().find(|p| p.is_dir()).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no cgroup for container {id} under {}", base.display()))
        })
    }

    /// The v1 controller directory (some hosts merge `cpu,cpuacct`).
    fn controller(&self, names: &[&str]) -> PathBuf {
        names.iter().map(|n| self.root.join(n)).find(|p| p.is_dir()).unwrap_or_else(|| self.root.join(names[0]))
    }

    /// Finds a container's files once; reading them each round then costs
    /// no directory lookups.
    pub fn resolve(&self, container_id: &str) -> io::Result<ContainerFiles> {
        match self.version {
            CgroupVersion::V1 => {
                let cpu = self.container_dir(&self.controller(&["cpuacct", "cpu,cpuacct"]), container_id)?;
                let memory = self.container_dir(&self.controller(&["memory"]), container_id)?;
                let blkio = self.container_dir(&self.controller(&["blkio"]), container_id)?;
                let pids = self.container_dir(&self.controller(&["pids"]), container_id)?;
                Ok(ContainerFiles {
                    version: CgroupVersion::V1,
                    cpu: cpu.join("cpuacct.usage"),
                    memory: memory.join("memory.usage_in_bytes"),
                    memory_stat: memory.join("memory.stat"),
                    io: blkio.join("blkio.throttle.io_service_bytes"),
                    pids: pids.join("pids.current"),
                })
            }
            CgroupVersion::V2 => {
                let dir = self.container_dir(&self.root, container_id)?;
                Ok(ContainerFiles {
                    version: CgroupVersion::V2,
                    cpu: dir.join("cpu.stat"),
                    memory: dir.join("memory.current"),
                    memory_stat: dir.join("memory.stat"),
                    io: dir.join("io.stat"),
                    pids: dir.join("pids.current"),
                })
            }
        }
    }

    /// The container's counters now.
    pub fn read(&self, container_id: &str, pid: u32) -> io::Result<RawCounters> {
        self.read_files(&self.resolve(container_id)?, pid)
    }

    /// The counters in `files`, and the network counters of `pid`'s namespace.
    pub fn read_files(&self, files: &ContainerFiles, pid: u32) -> io::Result<RawCounters> {
        let (cpu_usage_ns, inactive_key, (blk_read_bytes, blk_write_bytes)) = match files.version {
            CgroupVersion::V1 => {
                (read_number(&files.cpu)?, "total_inactive_file", parse_blkio_v1(&fs::read_to_string(&files.io)?))
            }
            CgroupVersion::V2 => (
                stat_value(&fs::read_to_string(&files.cpu)?, "usage_usec").saturating_mul(1000),
                "inactive_file",
                // io.stat is missing when the io controller is not enabled.
                parse_io_stat_v2(&fs::read_to_string(&files.io).unwrap_or_default()),
            ),
        };
        let usage = read_number(&files.memory)?;
        let inactive = stat_value(&fs::read_to_string(&files.memory_stat)?, inactive_key);
        let (net_rx_bytes, net_tx_bytes) =
            parse_net_dev(&fs::read_to_string(self.proc_root.join(pid.to_string()).join("net/dev"))?);
        Ok(RawCounters {
            cpu_usage_ns,
            memory_bytes: usage.saturating_sub(inactive),
            net_rx_bytes,
            net_tx_bytes,
            blk_read_bytes,
            blk_write_bytes,
            pids: read_number(&files.pids)?,
        })
    }

    /// When process `pid` started (clock ticks after boot, field 22 of
    /// `/proc/<pid>/stat`): tells a container's init apart from a later
    /// process that reused its pid.
    pub fn process_start_time(&self, pid: u32) -> io::Result<u64> {
        let stat = fs::read_to_string(self.proc_root.join(pid.to_string()).join("stat"))?;
        parse_start_time(&stat).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable /proc/<pid>/stat"))
    }
}

/// The files of one container's cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerFiles {
    version: CgroupVersion,
    cpu: PathBuf,
    memory: PathBuf,
    memory_stat: PathBuf,
    io: PathBuf,
    pids: PathBuf,
}

/// Field 22 of `/proc/<pid>/stat`; the command (field 2) may hold spaces
/// and parentheses, so fields are counted after its closing parenthesis.
fn parse_start_time(stat: &str) -> Option<u64> {
    let after_command = &stat[stat.rfind(')')? + 1..];
    after_command.split_whitespace().nth(19)?.parse().ok()
}

fn read_number(path: &Path) -> io::Result<u64> {
    let text = fs::read_to_string(path)?;
    text.trim().parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {text:?}", path.display())))
}

/// The value of `key` in a `key value` per line file (`memory.stat`, `cpu.stat`).
fn stat_value(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|line| line.split_once(' ').filter(|(k, _)| *k == key).and_then(|(_, v)| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// v1 `blkio.throttle.io_service_bytes`: `8:0 Read 4096` per device and op.
fn parse_blkio_v1(text: &str) -> (u64, u64) {
    text.lines().fold((0, 0), |(r, w), line| {
        let mut fields = line.split_whitespace();
        match (fields.next(), fields.next(), fields.next().and_then(|v| v.parse::<u64>().ok())) {
            (Some(device), Some("Read"), Some(n)) if device.contains(':') => (r + n, w),
            (Some(device), Some("Write"), Some(n)) if device.contains(':') => (r, w + n),
            _ => (r, w),
        }
    })
}

/// v2 `io.stat`: `8:0 rbytes=4096 wbytes=8192 rios=1 ...` per device.
fn parse_io_stat_v2(text: &str) -> (u64, u64) {
    text.lines().flat_map(|line| line.split_whitespace().skip(1)).fold((0, 0), |(r, w), field| {
        match field.split_once('=') {
            Some(("rbytes", v)) => (r + v.parse().unwrap_or(0), w),
            Some(("wbytes", v)) => (r, w + v.parse().unwrap_or(0)),
            _ => (r, w),
        }
    })
}

/// `/proc/<pid>/net/dev`: received and sent bytes of every interface but `lo`.
fn parse_net_dev(text: &str) -> (u64, u64) {
    text.lines().skip(2).fold((0, 0), |(rx, tx), line| {
        let Some((name, rest)) = line.split_once(':') else { return (rx, tx) };
        if name.trim() == "lo" {
            return (rx, tx);
        }
        let fields: Vec<u64> = rest.split_whitespace().filter_map(|f| f.parse().ok()).collect();
        match (fields.first(), fields.get(8)) {
            (Some(r), Some(t)) => (rx + r, tx + t),
            _ => (rx, tx),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET_DEV: &str = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1000       5    0    0    0     0          0         0     1000       5    0    0    0     0       0          0
  eth0:     486       5    0    0    0     0          0         0       90       1    0    0    0     0       0          0
  eth1:      14       1    0    0    0     0          0         0       10       1    0    0    0     0       0          0
";

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn temp() -> PathBuf {
        std::env::temp_dir().join(format!("flotilla-cgroup-{}", uuid::Uuid::new_v4().simple()))
    }

    #[test]
    fn files_are_parsed() {
        assert_eq!(parse_net_dev(NET_DEV), (500, 100), "lo is left out");
        assert_eq!(
            parse_blkio_v1("8:0 Read 4096\n8:0 Write 8192\n8:0 Total 12288\n8:16 Read 4\nTotal 12292\n"),
            (4100, 8192)
        );
        assert_eq!(parse_io_stat_v2("8:0 rbytes=100 wbytes=200 rios=1 wios=2\n8:16 rbytes=1 wbytes=2\n"), (101, 202));
        assert_eq!(stat_value("cache 5\ntotal_inactive_file 42\n", "total_inactive_file"), 42);
        assert_eq!(stat_value("usage_usec 77\nuser_usec 1\n", "usage_usec"), 77);
        let stat = "4242 (busy (box) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn a_v2_host_with_the_systemd_layout() {
        let root = temp();
        let proc_root = root.join("proc");
        let cgroup = root.join("cgroup");
        write(&cgroup.join("cgroup.controllers"), "cpu io memory pids");
        let dir = cgroup.join("system.slice/docker-abc.scope");
        write(&dir.join("cpu.stat"), "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n");
        write(&dir.join("memory.current"), "1000000\n");
        write(&dir.join("memory.stat"), "anon 10\ninactive_file 200000\n");
        write(&dir.join("io.stat"), "8:0 rbytes=4096 wbytes=512 rios=1 wios=1\n");
        write(&dir.join("pids.current"), "3\n");
        write(&proc_root.join("42/net/dev"), NET_DEV);
        let reader = CgroupReader::detect(&cgroup, &proc_root).expect("a v2 hierarchy");
        assert_eq!(reader.version(), CgroupVersion::V2);
        let c = reader.read("abc", 42).unwrap();
        assert_eq!(
            c,
            RawCounters {
                cpu_usage_ns: 2_500_000,
                memory_bytes: 800_000,
                net_rx_bytes: 500,
                net_tx_bytes: 100,
                blk_read_bytes: 4096,
                blk_write_bytes: 512,
                pids: 3,
            }
        );
        assert!(reader.read("missing", 42).is_err());
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_v1_host_with_the_cgroupfs_layout() {
        let root = temp();
        let proc_root = root.join("proc");
        let cgroup = root.join("cgroup");
        write(&cgroup.join("cpuacct/docker/abc/cpuacct.usage"), "25147954\n");
        write(&cgroup.join("memory/docker/abc/memory.usage_in_bytes"), "2727936\n");
        write(&cgroup.join("memory/docker/abc/memory.stat"), "cache 1826816\ntotal_inactive_file 360448\n");
        write(&cgroup.join("blkio/docker/abc/blkio.throttle.io_service_bytes"), "Total 0\n");
        write(&cgroup.join("pids/docker/abc/pids.current"), "2\n");
        write(&proc_root.join("7/net/dev"), NET_DEV);
        let reader = CgroupReader::detect(&cgroup, &proc_root).expect("a v1 hierarchy");
        assert_eq!(reader.version(), CgroupVersion::V1);
        let c = reader.read("abc", 7).unwrap();
        assert_eq!(c.cpu_usage_ns, 25_147_954);
        assert_eq!(c.memory_bytes, 2_727_936 - 360_448);
        assert_eq!((c.blk_read_bytes, c.blk_write_bytes, c.pids), (0, 0, 2));
        assert_eq!(c.net_rx_bytes, 500);
        fs::remove_dir_all(root).unwrap();
    }
}
