//! gRPC deadlines. Connect's `connect-timeout-ms` is enforced by
//! connectrpc-axum's layer, but gRPC services mounted beside it are not run
//! by tonic's server, so nothing would read `grpc-timeout`: this layer does.
//! A call still running at its deadline is answered `DEADLINE_EXCEEDED`,
//! and a stream at its deadline ends with that status in its trailers.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Request, Response, header};
use bytes::Bytes;
use http_body::Frame;
use tokio::time::{Instant, Sleep};

/// `DEADLINE_EXCEEDED` in gRPC's numbering.
const GRPC_DEADLINE_EXCEEDED: &str = "4";
const GRPC_DEADLINE_MESSAGE: &str = "deadline exceeded (grpc-timeout)";

/// Reads a `grpc-timeout` value: at most 8 digits and a unit (`H`, `M`,
/// `S`, `m`, `u`, `n`). Anything else is no deadline, as gRPC servers do.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The deadline a gRPC request asks for, if it is a gRPC request with one.
fn grpc_deadline(headers: &HeaderMap) -> Option<Instant> {
    let is_grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if !is_grpc {
        return None;
    }
    let timeout = parse_grpc_timeout(headers.get("grpc-timeout")?.to_str().ok()?)?;
    Some(Instant::now() + timeout)
}

fn deadline_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static(GRPC_DEADLINE_EXCEEDED));
    trailers.insert("grpc-message", HeaderValue::from_static(GRPC_DEADLINE_MESSAGE));
    trailers
}

/// A "trailers-only" gRPC answer: the status in the headers, no body.
fn deadline_response() -> Response<Body> {
    let mut response = Response::new(Body::empty());
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.extend(deadline_trailers());
    response
}

/// The layer around the whole API service (Connect requests pass untouched).
#[derive(Debug, Clone)]
pub struct GrpcDeadline<S> {
    inner: S,
}

impl<S> GrpcDeadline<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S> tower::Service<Request<Body>> for GrpcDeadline<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let deadline = grpc_deadline(request.headers());
        let future = self.inner.call(request);
        Box::pin(async move {
            let Some(deadline) = deadline else { return future.await };
            match tokio::time::timeout_at(deadline, future).await {
                Err(_) => Ok(deadline_response()),
                Ok(Ok(response)) => {
                    let (parts, body) = response.into_parts();
                    let body = DeadlineBody {
                        inner: body,
                        deadline: Box::pin(tokio::time::sleep_until(deadline)),
                        done: false,
                    };
                    Ok(Response::from_parts(parts, Body::new(body)))
                }
                Ok(Err(never)) => match never {},
            }
        })
    }
}

/// A response body that ends with `DEADLINE_EXCEEDED` trailers at the deadline.
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<Sleep>>,
    done: bool,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        // The deadline first: a stream that always has data ready still ends.
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.done = true;
            return Poll::Ready(Some(Ok(Frame::trailers(deadline_trailers()))));
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.done = true,
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => self.done = true,
            Poll::Ready(Some(Err(_))) => self.done = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_nonsense_is_no_deadline() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse_grpc_timeout("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "m", "100", "123456789S", "-1S", "1.5S", "10s", "1 S", "é"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_grpc_requests_get_a_deadline() {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-timeout", HeaderValue::from_static("1S"));
        assert!(grpc_deadline(&headers).is_none(), "no content type");
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(grpc_deadline(&headers).is_none(), "Connect has its own header");
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc+proto"));
        let deadline = grpc_deadline(&headers).expect("a deadline");
        assert!(deadline <= Instant::now() + Duration::from_secs(1));
        assert!(deadline > Instant::now() + Duration::from_millis(900));
    }
}
