//! What a container's exit tells about its replica, at once: Docker says a
//! container died (with its exit code) or started, and the agent records
//! the exit on the replica, takes it out of the route table and says
//! whether it is crash looping. Without this the row said `running` and
//! healthy until the next timed pass (a minute), while the edge kept
//! sending the dead container requests.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use flotilla_docker::ContainerEvent;
use flotilla_types::ReplicaId;

/// Exits within [`CRASH_LOOP_WINDOW`] from which a replica is crash looping.
pub const CRASH_LOOP_EXITS: usize = 3;
pub const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(60);
/// The agent restarts a crash-looping container no sooner than this after
/// its last exit, doubling per exit in the window (Docker's own restart
/// policy backs off the same way).
const RESTART_BACKOFF_MIN: Duration = Duration::from_secs(1);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The `die` events of one container since the last pass, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deaths {
    /// The exit code of each (when the event said).
    pub codes: Vec<Option<i32>>,
}

/// Containers that died since the last pass, from the events taken.
pub fn deaths(events: &[ContainerEvent]) -> HashMap<String, Deaths> {
    let mut deaths: HashMap<String, Deaths> = HashMap::new();
    for event in events.iter().filter(|e| e.action == "die") {
        let code = event.labels.get("exitCode").and_then(|c| c.parse().ok());
        deaths.entry(event.container_id.clone()).or_default().codes.push(code);
    }
    deaths
}

/// Recent exits of each replica.
#[derive(Debug, Default)]
pub struct ExitHistory {
    replicas: Mutex<HashMap<ReplicaId, Recent>>,
}

#[derive(Debug, Default)]
struct Recent {
    at: VecDeque<Instant>,
    last_code: Option<i32>,
}

impl Recent {
    fn prune(&mut self, now: Instant) {
        while self.at.front().is_some_and(|t| now.duration_since(*t) > CRASH_LOOP_WINDOW) {
            self.at.pop_front();
        }
    }
}

impl ExitHistory {
    /// Notes `count` exits of `replica` now, the last with `code`; returns
    /// how many it had within the window.
    pub fn record(&self, replica: ReplicaId, count: usize, code: Option<i32>) -> usize {
        self.record_at(replica, count, code, Instant::now())
    }

    fn record_at(&self, replica: ReplicaId, count: usize, code: Option<i32>, now: Instant) -> usize {
        let mut replicas = self.replicas.lock().unwrap_or_else(|e| e.into_inner());
        let recent = replicas.entry(replica).or_default();
        recent.prune(now);
        recent.at.extend(std::iter::repeat_n(now, count));
        recent.last_code = code.or(recent.last_code);
        recent.at.len()
    }

    /// Why the replica counts as crash looping, if it does.
    pub fn crash_looping(&self, replica: ReplicaId) -> Option<String> {
        let mut replicas = self.replicas.lock().unwrap_or_else(|e| e.into_inner());
        let recent = replicas.get_mut(&replica)?;
        recent.prune(Instant::now());
        (recent.at.len() >= CRASH_LOOP_EXITS).then(|| crash_loop_message(recent.at.len(), recent.last_code))
    }

    /// When the agent may start the replica's container again: crash
    /// looping replicas wait, longer for each exit.
    pub fn restart_not_before(&self, replica: ReplicaId) -> Option<Instant> {
        let mut replicas = self.replicas.lock().unwrap_or_else(|e| e.into_inner());
        let recent = replicas.get_mut(&replica)?;
        recent.prune(Instant::now());
        let exits = recent.at.len();
        if exits < CRASH_LOOP_EXITS {
            return None;
        }
        let doublings = u32::try_from(exits - CRASH_LOOP_EXITS).unwrap_or(u32::MAX).min(6);
        let wait = RESTART_BACKOFF_MIN.saturating_mul(1 << doublings).min(RESTART_BACKOFF_MAX);
        recent.at.back().map(|last| *last + wait)
    }

    /// Forgets replicas no longer on this node.
    pub fn retain(&self, keep: impl Fn(&ReplicaId) -> bool) {
        self.replicas.lock().unwrap_or_else(|e| e.into_inner()).retain(|id, _| keep(id));
    }
}

fn code_text(code: Option<i32>) -> String {
    code.map_or_else(|| "an unknown code".to_owned(), |c| c.to_string())
}

pub fn crash_loop_message(exits: usize, code: Option<i32>) -> String {
    format!("crash looping: exited {exits} times in the last minute, last with code {}", code_text(code))
}

/// What users are told of one exit that is not (yet) a crash loop.
pub fn exit_message(code: Option<i32>, running_again: bool) -> String {
    let then = if running_again { "started again" } else { "restarting" };
    format!("exited with code {}; {then}", code_text(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(action: &str, container: &str, code: Option<&str>) -> ContainerEvent {
        ContainerEvent {
            action: action.into(),
            container_id: container.into(),
            time_nanos: 0,
            labels: code.map(|c| HashMap::from([("exitCode".to_owned(), c.to_owned())])).unwrap_or_default(),
        }
    }

    #[test]
    fn deaths_carry_their_exit_codes() {
        let events = [
            event("kill", "a", None),
            event("die", "a", Some("137")),
            event("start", "a", None),
            event("die", "a", Some("1")),
            event("die", "b", None),
        ];
        let deaths = deaths(&events);
        assert_eq!(deaths["a"].codes, [Some(137), Some(1)]);
        assert_eq!(deaths["b"].codes, [None]);
        assert!(!deaths.contains_key("c"));
    }

    #[test]
    fn three_exits_in_a_minute_are_a_crash_loop_that_backs_off_and_ends() {
        let history = ExitHistory::default();
        let replica = ReplicaId::new();
        let start = Instant::now() - Duration::from_secs(120);
        assert_eq!(history.record_at(replica, 2, Some(3), start), 2);
        assert_eq!(history.crash_looping(replica), None, "two minutes ago: over");
        assert_eq!(history.record(replica, 1, Some(3)), 1, "old exits leave the window");
        assert!(history.crash_looping(replica).is_none());
        assert!(history.restart_not_before(replica).is_none(), "a single exit restarts at once");
        history.record(replica, 2, None);
        let why = history.crash_looping(replica).expect("looping");
        assert_eq!(why, "crash looping: exited 3 times in the last minute, last with code 3");
        let first = history.restart_not_before(replica).unwrap();
        history.record(replica, 1, Some(4));
        assert!(history.restart_not_before(replica).unwrap() > first + Duration::from_millis(900), "it doubles");
        history.retain(|_| false);
        assert!(history.crash_looping(replica).is_none());
    }
}
