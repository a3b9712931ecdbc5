//! How Flotilla's background loops run: each is a named task that runs a pass
//! on a timer and on every wake-up, backs off after a failed pass, and stops
//! when its `CancellationToken` fires.

pub mod breaker;
pub mod retry;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// What a pass asks of the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// All done: the next pass on the next wake-up or after the interval.
    Interval,
    /// Failed or left work undone: again soon, with exponential backoff
    /// (never later than the interval).
    RetrySoon,
    /// Work is under way that needs watching: again after this long (never
    /// later than the interval), without backing off.
    After(Duration),
}

/// A periodic loop.
#[derive(Debug, Clone)]
pub struct PeriodicTask {
    pub name: &'static str,
    pub interval: Duration,
    /// Notified to run a pass at once.
    pub wake: Option<Arc<Notify>>,
    /// Run a pass as soon as the loop starts (otherwise wait first).
    pub pass_at_start: bool,
}

/// Runs `pass` as `task` says until `cancel` fires.
pub async fn run_periodically<F, Fut>(task: PeriodicTask, cancel: CancellationToken, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Next>,
{
    let mut backoff = retry::reconciler_delays();
    let mut next = if task.pass_at_start { None } else { Some(Next::Interval) };
    loop {
        let outcome = match next.take() {
            Some(outcome) => outcome,
            None => pass().await,
        };
        let delay = match outcome {
            Next::Interval => {
                backoff = retry::reconciler_delays();
                task.interval
            }
            Next::RetrySoon => backoff.next().unwrap_or(task.interval).min(task.interval),
            Next::After(delay) => {
                backoff = retry::reconciler_delays();
                delay.min(task.interval)
            }
        };
        let woken = async {
            match &task.wake {
                Some(wake) => wake.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => break,
            () = woken => {}
            () = tokio::time::sleep(delay) => {}
        }
    }
    tracing::info!(task = task.name, "stopped");
}

/// Spawns `task` on `tracker`, in `span`: each pass calls `pass` with a
/// clone of `owner` (the role that runs the loop), until `cancel` fires.
pub fn spawn_periodic<T, F, Fut>(
    tracker: &TaskTracker,
    cancel: &CancellationToken,
    span: tracing::Span,
    task: PeriodicTask,
    owner: &Arc<T>,
    pass: F,
) where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>) -> Fut + Send + 'static,
    Fut: Future<Output = Next> + Send + 'static,
{
    let owner = owner.clone();
    tracker.spawn(run_periodically(task, cancel.clone(), move || pass(owner.clone())).instrument(span));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn task(wake: Option<Arc<Notify>>, pass_at_start: bool) -> PeriodicTask {
        PeriodicTask { name: "test", interval: Duration::from_secs(3600), wake, pass_at_start }
    }

    #[tokio::test(start_paused = true)]
    async fn passes_run_on_wake_ups_and_stop_on_cancel() {
        let wake = Arc::new(Notify::new());
        let cancel = CancellationToken::new();
        let passes = Arc::new(AtomicUsize::new(0));
        let counter = passes.clone();
        let handle = tokio::spawn(run_periodically(task(Some(wake.clone()), false), cancel.clone(), move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Next::Interval
            }
        }));
        tokio::task::yield_now().await;
        assert_eq!(passes.load(Ordering::SeqCst), 0, "no pass before the first wake-up");
        wake.notify_one();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(passes.load(Ordering::SeqCst), 1);
        cancel.cancel();
        handle.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_pass_is_retried_before_the_interval() {
        let cancel = CancellationToken::new();
        let passes = Arc::new(AtomicUsize::new(0));
        let counter = passes.clone();
        let handle = tokio::spawn(run_periodically(task(None, true), cancel.clone(), move || {
            let counter = counter.clone();
            async move {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                if n < 3 { Next::RetrySoon } else { Next::Interval }
            }
        }));
        // Backoff delays are well under a minute; the interval is an hour.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(passes.load(Ordering::SeqCst), 4, "three retries, then wait for the interval");
        cancel.cancel();
        handle.await.unwrap();
    }
}
