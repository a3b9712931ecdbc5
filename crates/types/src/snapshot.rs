//! PostgreSQL MVCC snapshots (`pg_snapshot`), compared without the database.
//!
//! The edge uses them to know what a proxy has: every route table is read in
//! one snapshot, and a proxy that fetched a table read in snapshot `S` holds
//! every change committed in `S`. An agent about to stop a container takes a
//! snapshot after it saw the reason (a stop, a scale-down, a new container
//! taking over) and waits until every proxy holds a table whose snapshot
//! [`includes`](DbSnapshot::includes) it.

use std::fmt;
use std::str::FromStr;

/// A snapshot in PostgreSQL's text form `xmin:xmax:xip,xip,...`: every
/// transaction below `xmin` had ended, none from `xmax` on had started, and
/// those listed in between were still running.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DbSnapshot {
    xmin: u64,
    xmax: u64,
    /// Sorted.
    running: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a PostgreSQL snapshot (xmin:xmax:xip,...)")]
pub struct BadSnapshot(pub String);

impl DbSnapshot {
    /// Whether every transaction that had committed when `earlier` was
    /// taken had also committed when `self` was: a reader of `self` sees at
    /// least what a reader of `earlier` saw. True when `self` was taken after
    /// `earlier`, whatever ran meanwhile (a long transaction running in both
    /// holds neither back).
    pub fn includes(&self, earlier: &DbSnapshot) -> bool {
        // A transaction that began after `self` was taken is unknown to it.
        if self.xmax < earlier.xmax {
            return false;
        }
        // Below earlier's xmax, `self` may still see running only what
        // `earlier` saw running too; anything else had ended for `earlier`.
        self.running.iter().take_while(|x| **x < earlier.xmax).all(|x| earlier.running.binary_search(x).is_ok())
    }

    pub fn xmax(&self) -> u64 {
        self.xmax
    }
}

impl FromStr for DbSnapshot {
    type Err = BadSnapshot;

    fn from_str(text: &str) -> Result<Self, BadSnapshot> {
        let bad = || BadSnapshot(text.to_owned());
        let mut parts = text.split(':');
        let (Some(xmin), Some(xmax), Some(xip), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let xmin: u64 = xmin.parse().map_err(|_| bad())?;
        let xmax: u64 = xmax.parse().map_err(|_| bad())?;
        let mut running = xip
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|x| x.parse::<u64>().map_err(|_| bad()))
            .collect::<Result<Vec<_>, _>>()?;
        running.sort_unstable();
        if xmin > xmax || running.iter().any(|x| *x < xmin || *x >= xmax) {
            return Err(bad());
        }
        Ok(Self { xmin, xmax, running })
    }
}

impl fmt::Display for DbSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:", self.xmin, self.xmax)?;
        for (i, x) in self.running.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(text: &str) -> DbSnapshot {
        text.parse().unwrap()
    }

    #[test]
    fn parses_and_prints_postgresql_text() {
        assert_eq!(s("10:20:").to_string(), "10:20:");
        assert_eq!(s("10:20:15,12").to_string(), "10:20:12,15");
        for bad in ["", "1:2", "1:2:3:4", "a:2:", "5:4:", "10:20:9", "10:20:20", "10:20:x"] {
            assert!(bad.parse::<DbSnapshot>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_later_snapshot_includes_an_earlier_one() {
        // 12 and 15 were running; later 12 committed and 21 began.
        let earlier = s("12:20:12,15");
        assert!(s("15:22:15,21").includes(&earlier));
        assert!(earlier.includes(&earlier));
        // Still running in both: a long transaction holds nothing back.
        assert!(s("12:30:12,25").includes(&earlier));
        // 14 committed for `earlier` but runs in the other: that one is older.
        assert!(!s("12:20:12,14,15").includes(&earlier));
        // Taken before 19 began, which `earlier` saw end.
        assert!(!s("12:19:12,15").includes(&earlier));
        assert!(!earlier.includes(&s("15:22:15,21")), "an earlier snapshot does not include a later one");
    }

    /// Snapshots of one history: transactions 1..=n begin in order; `ended`
    /// says which had ended by the time each snapshot was taken.
    fn snapshot_at(began: u64, ended: &[bool]) -> DbSnapshot {
        let running: Vec<u64> = (1..=began).filter(|x| !ended[*x as usize - 1]).collect();
        let xmin = running.first().copied().unwrap_or(began + 1);
        DbSnapshot { xmin, xmax: began + 1, running }
    }

    proptest! {
        /// Whatever the order transactions end in, a snapshot taken later
        /// includes one taken earlier, and one taken earlier does not
        /// include a later one in which more had ended.
        #[test]
        fn inclusion_follows_time(order in Just((0..12u64).collect::<Vec<_>>()).prop_shuffle(), cut in 0..12usize, later in 0..12usize) {
            let (first, second) = (cut.min(later), cut.max(later));
            // Transactions 1..=12 all begin first; they end in `order`.
            let mut ended = vec![false; 12];
            let mut snapshots = Vec::new();
            for (step, x) in order.iter().enumerate() {
                if step == first || step == second {
                    snapshots.push(snapshot_at(12, &ended));
                }
                ended[*x as usize] = true;
            }
            let (a, b) = (&snapshots[0], snapshots.last().unwrap());
            prop_assert!(b.includes(a));
            if first != second {
                prop_assert!(!a.includes(b));
            }
        }
    }
}
