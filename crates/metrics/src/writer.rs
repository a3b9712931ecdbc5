//! Writes samples and minute aggregates to the metrics store in batches.
//! Collection never waits for it: batches go into a bounded buffer (counted
//! in rows) that the writer drains; a batch that fails stays at the front
//! and is retried with exponential backoff. When the buffer is full, the
//! oldest batches are dropped and every dropped row is counted. Two
//! statements run at once (on two connections), and a backlog is written
//! in statements of up to 10,000 rows.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_store::metrics::MetricsStore;
use flotilla_types::metrics::{MinuteAggregate, Sample};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// What goes to the store.
#[derive(Debug, Clone)]
pub enum Batch {
    Samples(Vec<Sample>),
    Minutes(Vec<MinuteAggregate>),
}

impl Batch {
    pub fn rows(&self) -> usize {
        match self {
            Self::Samples(s) => s.len(),
            Self::Minutes(m) => m.len(),
        }
    }
}

/// The writer's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WriterStats {
    pub batches_written: u64,
    pub rows_written: u64,
    pub sample_rows_written: u64,
    pub minute_rows_written: u64,
    pub write_failures: u64,
    pub buffered_batches: usize,
    pub buffered_rows: usize,
    pub dropped_batches: u64,
    pub dropped_rows: u64,
    /// When the last batch was written, milliseconds since the epoch (0: never).
    pub last_write_ms: i64,
}

/// Rows merged into one statement at most when the buffer holds a backlog.
const MAX_STATEMENT_ROWS: usize = 10_000;

#[derive(Debug)]
struct Buffered {
    seq: u64,
    batch: Batch,
}

#[derive(Debug)]
pub struct Writer {
    node_id: String,
    store: MetricsStore,
    capacity_rows: usize,
    /// Statements in flight at once (each on its own connection).
    concurrency: usize,
    buffer: Mutex<VecDeque<Buffered>>,
    next_seq: AtomicU64,
    buffered_rows: AtomicUsize,
    notify: Notify,
    batches_written: AtomicU64,
    sample_rows_written: AtomicU64,
    minute_rows_written: AtomicU64,
    write_failures: AtomicU64,
    dropped_batches: AtomicU64,
    dropped_rows: AtomicU64,
    last_write_ms: AtomicI64,
    /// The last attempt failed.
    failing: AtomicBool,
}

/// Batches written together: adjacent ones of the same kind, merged.
#[derive(Debug)]
struct Job {
    seqs: Vec<u64>,
    batch: Batch,
}

impl Writer {
    pub fn new(node_id: String, store: MetricsStore, capacity_rows: usize) -> Self {
        Self::with_concurrency(node_id, store, capacity_rows, 2)
    }

    pub fn with_concurrency(node_id: String, store: MetricsStore, capacity_rows: usize, concurrency: usize) -> Self {
        Self {
            node_id,
            store,
            capacity_rows: capacity_rows.max(1),
            concurrency: concurrency.max(1),
            buffer: Mutex::new(VecDeque::new()),
            next_seq: AtomicU64::new(0),
            buffered_rows: AtomicUsize::new(0),
            notify: Notify::new(),
            batches_written: AtomicU64::new(0),
            sample_rows_written: AtomicU64::new(0),
            minute_rows_written: AtomicU64::new(0),
            write_failures: AtomicU64::new(0),
            dropped_batches: AtomicU64::new(0),
            dropped_rows: AtomicU64::new(0),
            last_write_ms: AtomicI64::new(0),
            failing: AtomicBool::new(false),
        }
    }

    /// Queues a batch; never waits. Drops the oldest batches while the
    /// buffer holds more rows than it may.
    pub fn submit(&self, batch: Batch) {
        if batch.rows() == 0 {
            return;
        }
        {
            let mut buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
            self.buffered_rows.fetch_add(batch.rows(), Ordering::Relaxed);
            buffer.push_back(Buffered { seq: self.next_seq.fetch_add(1, Ordering::Relaxed), batch });
            while self.buffered_rows.load(Ordering::Relaxed) > self.capacity_rows {
                let Some(oldest) = buffer.pop_front() else { break };
                let rows = oldest.batch.rows();
                self.buffered_rows.fetch_sub(rows, Ordering::Relaxed);
                self.dropped_batches.fetch_add(1, Ordering::Relaxed);
                self.dropped_rows.fetch_add(rows as u64, Ordering::Relaxed);
                tracing::warn!(rows, "metrics write buffer full: dropped the oldest batch");
            }
        }
        self.notify.notify_one();
    }

    /// Whether the last write attempt failed (the buffer is being retried).
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> WriterStats {
        let buffered_batches = self.buffer.lock().unwrap_or_else(|e| e.into_inner()).len();
        let samples = self.sample_rows_written.load(Ordering::Relaxed);
        let minutes = self.minute_rows_written.load(Ordering::Relaxed);
        WriterStats {
            batches_written: self.batches_written.load(Ordering::Relaxed),
            rows_written: samples + minutes,
            sample_rows_written: samples,
            minute_rows_written: minutes,
            write_failures: self.write_failures.load(Ordering::Relaxed),
            buffered_batches,
            buffered_rows: self.buffered_rows.load(Ordering::Relaxed),
            dropped_batches: self.dropped_batches.load(Ordering::Relaxed),
            dropped_rows: self.dropped_rows.load(Ordering::Relaxed),
            last_write_ms: self.last_write_ms.load(Ordering::Relaxed),
        }
    }

    /// The oldest buffered batches as up to `concurrency` jobs, adjacent
    /// batches of a kind merged up to [`MAX_STATEMENT_ROWS`].
    fn next_jobs(&self) -> Vec<Job> {
        let buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        let mut jobs: Vec<Job> = Vec::new();
        for item in buffer.iter() {
            let merged = match (jobs.last_mut(), &item.batch) {
                (Some(job), Batch::Samples(more)) if job.batch.rows() + more.len() <= MAX_STATEMENT_ROWS => {
                    match &mut job.batch {
                        Batch::Samples(rows) => {
                            rows.extend(more.iter().cloned());
                            job.seqs.push(item.seq);
                            true
                        }
                        Batch::Minutes(_) => false,
                    }
                }
                (Some(job), Batch::Minutes(more)) if job.batch.rows() + more.len() <= MAX_STATEMENT_ROWS => {
                    match &mut job.batch {
                        Batch::Minutes(rows) => {
                            rows.extend(more.iter().cloned());
                            job.seqs.push(item.seq);
                            true
                        }
                        Batch::Samples(_) => false,
                    }
                }
                _ => false,
            };
            if !merged {
                if jobs.len() == self.concurrency {
                    break;
                }
                jobs.push(Job { seqs: vec![item.seq], batch: item.batch.clone() });
            }
        }
        jobs
    }

    /// Writes the oldest buffered batches (up to `concurrency` statements at
    /// once); `Ok(false)` when there was nothing to write. Batches that fail
    /// stay in the buffer, first in line.
    pub async fn write_some(&self) -> Result<bool, flotilla_store::StoreError> {
        let jobs = self.next_jobs();
        if jobs.is_empty() {
            return Ok(false);
        }
        let results = futures::future::join_all(jobs.iter().map(|job| async move {
            match &job.batch {
                Batch::Samples(samples) => self.store.write_samples(&self.node_id, samples).await,
                Batch::Minutes(minutes) => self.store.write_minutes(&self.node_id, minutes).await,
            }
        }))
        .await;
        let mut first_error = None;
        for (job, result) in jobs.iter().zip(results) {
            match result {
                Ok(_) => self.written(job),
                Err(error) => {
                    self.write_failures.fetch_add(1, Ordering::Relaxed);
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            None => {
                self.failing.store(false, Ordering::Relaxed);
                Ok(true)
            }
            Some(error) => {
                self.failing.store(true, Ordering::Relaxed);
                Err(error)
            }
        }
    }

    /// Takes a written job's batches out of the buffer (those still there:
    /// an overflow may have dropped some meanwhile, already counted).
    fn written(&self, job: &Job) {
        let mut buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        let mut counted = 0u64;
        buffer.retain(|item| {
            if job.seqs.contains(&item.seq) {
                let rows = item.batch.rows();
                self.buffered_rows.fetch_sub(rows, Ordering::Relaxed);
                counted += rows as u64;
                self.batches_written.fetch_add(1, Ordering::Relaxed);
                false
            } else {
                true
            }
        });
        let counter = match job.batch {
            Batch::Samples(_) => &self.sample_rows_written,
            Batch::Minutes(_) => &self.minute_rows_written,
        };
        counter.fetch_add(counted, Ordering::Relaxed);
        self.last_write_ms.store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    /// Drains the buffer as batches come, retrying failures with backoff,
    /// until `cancel`; then tries once more to write what is left.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = flotilla_runtime::retry::delays(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            match self.write_some().await {
                Ok(true) => {
                    backoff = flotilla_runtime::retry::delays(Duration::from_millis(200), Duration::from_secs(10));
                    continue;
                }
                Ok(false) => {
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = self.notify.notified() => {}
                    }
                }
                Err(error) => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(%error, retry_in = ?delay, buffered_rows = self.buffered_rows.load(Ordering::Relaxed), "metrics write failed; will retry");
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        // Shutting down: one last attempt, bounded in time.
        let flush = async { while let Ok(true) = self.write_some().await {} };
        if tokio::time::timeout(Duration::from_secs(5), flush).await.is_err() {
            tracing::warn!(rows = self.buffered_rows.load(Ordering::Relaxed), "metrics left unwritten at shutdown");
        }
    }
}
