//! Host port allocation for replicas on this node.

use std::collections::HashSet;
use std::net::{IpAddr, TcpListener};
use std::ops::RangeInclusive;
use std::sync::Mutex;

/// Hands out host ports from a range. A port is skipped when a replica row or
/// container of this node uses it, when it was handed out and not yet
/// released, or when it cannot be bound on the host. Another agent on the
/// same engine may still race us for a port: the engine then refuses the
/// start and the caller asks again.
#[derive(Debug)]
pub struct PortAllocator {
    range: RangeInclusive<u16>,
    host_ip: IpAddr,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    next: u16,
    reserved: HashSet<u16>,
}

impl PortAllocator {
    pub fn new(range: RangeInclusive<u16>, host_ip: IpAddr) -> Self {
        let next = *range.start();
        Self { range, host_ip, state: Mutex::new(State { next, reserved: HashSet::new() }) }
    }

    /// A free port not in `in_use`, reserved until [`release`](Self::release).
    pub fn allocate(&self, in_use: &HashSet<u16>) -> Option<u16> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (start, end) = (*self.range.start(), *self.range.end());
        let size = usize::from(end - start) + 1;
        for _ in 0..size {
            let port = state.next;
            state.next = if port >= end { start } else { port + 1 };
            if in_use.contains(&port) || state.reserved.contains(&port) {
                continue;
            }
            if TcpListener::bind((self.host_ip, port)).is_err() {
                continue;
            }
            state.reserved.insert(port);
            return Some(port);
        }
        None
    }

    pub fn release(&self, port: u16) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).reserved.remove(&port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// Three consecutive ports nobody holds, below the ephemeral range
    /// (where other tests' outgoing connections take local ports).
    fn free_block() -> u16 {
        for _ in 0..100 {
            let start = 10_000 + (rand_u16() % 9_000);
            if (start..start + 3).all(|p| TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok()) {
                return start;
            }
        }
        panic!("no free block of ports");
    }

    fn rand_u16() -> u16 {
        uuid::Uuid::new_v4().as_u128() as u16
    }

    #[test]
    fn ports_are_unique_until_released() {
        let start = free_block();
        let alloc = PortAllocator::new(start..=start + 2, IpAddr::V4(Ipv4Addr::LOCALHOST));
        let used = HashSet::from([start + 1]);
        let a = alloc.allocate(&used).unwrap();
        let b = alloc.allocate(&used).unwrap();
        assert_ne!(a, b);
        assert!(!used.contains(&a) && !used.contains(&b));
        assert_eq!(alloc.allocate(&used), None, "range exhausted");
        alloc.release(a);
        assert_eq!(alloc.allocate(&used), Some(a));
    }

    #[test]
    fn a_port_bound_by_someone_else_is_skipped() {
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let alloc = PortAllocator::new(port..=port, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(alloc.allocate(&HashSet::new()), None);
        drop(taken);
        assert_eq!(alloc.allocate(&HashSet::new()), Some(port));
    }
}
