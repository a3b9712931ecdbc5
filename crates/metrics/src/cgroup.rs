//! The fast path: a container's counters read straight from its cgroup files
//! (v1 or v2, cgroupfs or systemd layout) and its network namespace's
//! counters from `/proc/<pid>/net/dev`. No call to the engine.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
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

    /// Opens a container's files once (its cgroup's and those of its init
    /// process `pid`); each round then reads them in place with one `pread`
    /// each, with no path lookups and no open or close: 7 descriptors per
    /// container.
    pub fn resolve(&self, container_id: &str, pid: u32) -> io::Result<ContainerFiles> {
        let process = self.proc_root.join(pid.to_string());
        let (cpu, memory, memory_stat, io, pids) = match self.version {
            CgroupVersion::V1 => {
                let cpu = self.container_dir(&self.controller(&["cpuacct", "cpu,cpuacct"]), container_id)?;
                let memory = self.container_dir(&self.controller(&["memory"]), container_id)?;
                let blkio = self.container_dir(&self.controller(&["blkio"]), container_id)?;
                let pids = self.container_dir(&self.controller(&["pids"]), container_id)?;
                (
                    open(&cpu.join("cpuacct.usage"))?,
                    open(&memory.join("memory.usage_in_bytes"))?,
                    open(&memory.join("memory.stat"))?,
                    Some(open(&blkio.join("blkio.throttle.io_service_bytes"))?),
                    open(&pids.join("pids.current"))?,
                )
            }
            CgroupVersion::V2 => {
                let dir = self.container_dir(&self.root, container_id)?;
                (
                    open(&dir.join("cpu.stat"))?,
                    open(&dir.join("memory.current"))?,
                    open(&dir.join("memory.stat"))?,
                    // io.stat is missing when the io controller is not enabled.
                    open(&dir.join("io.stat")).ok(),
                    open(&dir.join("pids.current"))?,
                )
            }
        };
        Ok(ContainerFiles {
            version: self.version,
            cpu,
            memory,
            memory_stat,
            io,
            pids,
            net_dev: open(&process.join("net/dev"))?,
            process_stat: open(&process.join("stat"))?,
        })
    }

    /// The container's counters now (opening its files for this one read).
    pub fn read(&self, container_id: &str, pid: u32) -> io::Result<RawCounters> {
        self.resolve(container_id, pid)?.read()
    }
}

/// The open files of one container: its cgroup's, and its init process's
/// `stat` and network counters. A descriptor keeps naming the same cgroup
/// and process: once they are gone, reads fail (see [`is_gone`]) rather
/// than reach whatever reused the pid.
#[derive(Debug)]
pub struct ContainerFiles {
    version: CgroupVersion,
    cpu: File,
    memory: File,
    memory_stat: File,
    io: Option<File>,
    pids: File,
    net_dev: File,
    process_stat: File,
}

impl ContainerFiles {
    /// The counters now.
    pub fn read(&self) -> io::Result<RawCounters> {
        let (cpu_usage_ns, inactive_key, (blk_read_bytes, blk_write_bytes)) = match self.version {
            CgroupVersion::V1 => {
                let io = match &self.io {
                    Some(file) => with_text(file, parse_blkio_v1)?,
                    None => (0, 0),
                };
                (read_number(&self.cpu)?, "total_inactive_file", io)
            }
            CgroupVersion::V2 => {
                let io = match &self.io {
                    Some(file) => with_text(file, parse_io_stat_v2)?,
                    None => (0, 0),
                };
                (with_text(&self.cpu, |t| stat_value(t, "usage_usec"))?.saturating_mul(1000), "inactive_file", io)
            }
        };
        let usage = read_number(&self.memory)?;
        let inactive = with_text(&self.memory_stat, |t| stat_value(t, inactive_key))?;
        let (net_rx_bytes, net_tx_bytes) = with_text(&self.net_dev, parse_net_dev)?;
        Ok(RawCounters {
            cpu_usage_ns,
            memory_bytes: usage.saturating_sub(inactive),
            net_rx_bytes,
            net_tx_bytes,
            blk_read_bytes,
            blk_write_bytes,
            pids: read_number(&self.pids)?,
        })
    }

    /// When the init process started (clock ticks after boot, field 22 of
    /// `/proc/<pid>/stat`): tells a container's init apart from a later
    /// process with its pid.
    pub fn process_start(&self) -> io::Result<u64> {
        with_text(&self.process_stat, parse_start_time)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable /proc/<pid>/stat"))
    }
}

/// Whether a read failed because the container or its process is gone:
/// the file was removed, the process exited (`ESRCH`), or the cgroup was
/// removed under an open descriptor (`ENODEV`).
pub fn is_gone(error: &io::Error) -> bool {
    const ESRCH: i32 = 3;
    const ENODEV: i32 = 19;
    error.kind() == io::ErrorKind::NotFound || matches!(error.raw_os_error(), Some(ESRCH | ENODEV))
}

fn open(path: &Path) -> io::Result<File> {
    File::open(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

thread_local! {
    /// Reused by every read on a thread: reading allocates nothing.
    static READ_BUFFER: RefCell<Vec<u8>> = RefCell::new(vec![0; 4096]);
}

/// Reads `file` from its start and hands its text to `parse`. These files
/// are generated on each read; a read shorter than the space left is their end.
fn with_text<T>(file: &File, parse: impl FnOnce(&str) -> T) -> io::Result<T> {
    READ_BUFFER.with_borrow_mut(|buffer| {
        let mut len = 0;
        loop {
            if buffer.len() - len < 512 {
                let grown = buffer.len() * 2;
                buffer.resize(grown, 0);
            }
            let room = buffer.len() - len;
            let n = file.read_at(&mut buffer[len..], len as u64)?;
            len += n;
            if n < room {
                break;
            }
        }
        let text = std::str::from_utf8(&buffer[..len]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(parse(text))
    })
}

/// Field 22 of `/proc/<pid>/stat`; the command (field 2) may hold spaces
/// and parentheses, so fields are counted after its closing parenthesis.
fn parse_start_time(stat: &str) -> Option<u64> {
    let after_command = &stat[stat.rfind(')')? + 1..];
    after_command.split_whitespace().nth(19)?.parse().ok()
}

fn read_number(file: &File) -> io::Result<u64> {
    with_text(file, |text| text.trim().parse().ok())?
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a number"))
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

    use std::fs;

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
        write(&proc_root.join("42/stat"), "42 (sh) S 1 42 42 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 1 0 1234 1000 10");
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
        // Counters are read again in place from the open files.
        let files = reader.resolve("abc", 42).unwrap();
        write(&dir.join("pids.current"), "12\n");
        assert_eq!(files.read().unwrap().pids, 12);
        assert_eq!(files.process_start().unwrap(), 1234);
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
        write(&proc_root.join("7/stat"), "7 (sh) S 1 7 7 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 1 0 99 1000 10");
        let reader = CgroupReader::detect(&cgroup, &proc_root).expect("a v1 hierarchy");
        assert_eq!(reader.version(), CgroupVersion::V1);
        let files = reader.resolve("abc", 7).unwrap();
        assert_eq!(files.process_start().unwrap(), 99);
        let c = files.read().unwrap();
        assert_eq!(c.cpu_usage_ns, 25_147_954);
        assert_eq!(c.memory_bytes, 2_727_936 - 360_448);
        assert_eq!((c.blk_read_bytes, c.blk_write_bytes, c.pids), (0, 0, 2));
        assert_eq!(c.net_rx_bytes, 500);
        fs::remove_dir_all(root).unwrap();
    }
}
