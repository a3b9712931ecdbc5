//! The engine's long-lived streams: container events and container logs.

use std::collections::HashMap;

use bollard::container::LogOutput;
use bollard::query_parameters::{EventsOptionsBuilder, LogsOptionsBuilder};
use flotilla_types::{NodeId, labels};
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::{DockerClient, DockerError};

/// A lifecycle event of a managed container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    /// `die`, `destroy`, `start`, `health_status: unhealthy`, ...
    pub action: String,
    pub container_id: String,
    /// When it happened, in nanoseconds since the Unix epoch.
    pub time_nanos: i64,
    pub labels: HashMap<String, String>,
}

pub type EventStream = BoxStream<'static, Result<ContainerEvent, DockerError>>;

/// Which output a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSource {
    Stdout,
    Stderr,
}

/// One line a container wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub source: LogSource,
    /// RFC 3339 with nanoseconds, as the engine stamped it (when asked for).
    pub timestamp: Option<String>,
    pub text: String,
}

pub type LogStream = BoxStream<'static, Result<LogLine, DockerError>>;

/// What part of a container's log to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// Only the last `n` lines (all when `None`).
    pub tail: Option<usize>,
    /// Keep streaming new lines until the container stops or the stream is dropped.
    pub follow: bool,
    pub timestamps: bool,
    /// Only lines since this Unix time (seconds).
    pub since: Option<i32>,
}

impl DockerClient {
    /// Events of the managed containers of `node`, starting at `since_nanos`
    /// (Unix nanoseconds) when given: subscribing with a `since` from before
    /// a container list means no event between the list and the subscription
    /// is lost.
    pub fn container_events(&self, node: &NodeId, since_nanos: Option<i64>) -> EventStream {
        let filters = HashMap::from([
            ("type", vec!["container".to_owned()]),
            ("label", labels::node_filter(node.as_str()).to_vec()),
        ]);
        let mut builder = EventsOptionsBuilder::default().filters(&filters);
        let since = since_nanos.map(|n| format!("{}.{:09}", n.div_euclid(1_000_000_000), n.rem_euclid(1_000_000_000)));
        if let Some(since) = &since {
            builder = builder.since(since);
        }
        self.docker
            .events(Some(builder.build()))
            .filter_map(|item| async move {
                match item {
                    Ok(message) => {
                        let actor = message.actor?;
                        Some(Ok(ContainerEvent {
                            action: message.action.unwrap_or_default(),
                            container_id: actor.id.unwrap_or_default(),
                            time_nanos: message
                                .time_nano
                                .or(message.time.map(|t| t.saturating_mul(1_000_000_000)))
                                .unwrap_or_default(),
                            labels: actor.attributes.unwrap_or_default(),
                        }))
                    }
                    Err(e) => Some(Err(DockerError::from_bollard("streaming events", "")(e))),
                }
            })
            .boxed()
    }

    /// A container's log lines, in the order it wrote them.
    pub fn logs(&self, id: &str, options: &LogOptions) -> LogStream {
        let tail = options.tail.map_or_else(|| "all".to_owned(), |n| n.to_string());
        let query = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .follow(options.follow)
            .timestamps(options.timestamps)
            .since(options.since.unwrap_or(0))
            .tail(&tail)
            .build();
        let timestamps = options.timestamps;
        let subject = id.to_owned();
        self.docker
            .logs(id, Some(query))
            .map(move |item| match item {
                Ok(output) => Ok(split_lines(output, timestamps)),
                Err(e) => Err(DockerError::from_bollard("reading logs", &subject)(e)),
            })
            .flat_map(|chunk: Result<Vec<LogLine>, DockerError>| {
                futures::stream::iter(match chunk {
                    Ok(lines) => lines.into_iter().map(Ok).collect::<Vec<_>>(),
                    Err(e) => vec![Err(e)],
                })
            })
            .boxed()
    }
}

/// Splits one chunk of output into lines, taking off the engine's timestamp.
fn split_lines(output: LogOutput, timestamps: bool) -> Vec<LogLine> {
    let (source, bytes) = match output {
        LogOutput::StdErr { message } => (LogSource::Stderr, message),
        LogOutput::StdOut { message } | LogOutput::Console { message } | LogOutput::StdIn { message } => {
            (LogSource::Stdout, message)
        }
    };
    let text = String::from_utf8_lossy(&bytes);
    text.split_terminator('\n')
        .map(|line| {
            let line = line.strip_suffix('\r').unwrap_or(line);
            let (timestamp, text) = match line.split_once(' ') {
                Some((stamp, rest)) if timestamps => (Some(stamp.to_owned()), rest),
                _ => (None, line),
            };
            LogLine { source, timestamp, text: text.to_owned() }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_split_into_lines_with_their_timestamps() {
        let chunk = LogOutput::StdOut {
            message: "2026-11-21T06:00:00.000000001Z one\n2026-11-21T06:00:00.000000002Z two words\n".into(),
        };
        let lines = split_lines(chunk, true);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].timestamp.as_deref(), Some("2026-11-21T06:00:00.000000001Z"));
        assert_eq!(lines[1].text, "two words");
        let plain = split_lines(LogOutput::StdErr { message: "a b\r\n".into() }, false);
        assert_eq!(plain, vec![LogLine { source: LogSource::Stderr, timestamp: None, text: "a b".into() }]);
    }
}
