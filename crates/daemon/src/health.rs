//! `flotillad health`: an HTTP/1.0 GET of the health endpoint with nothing
//! but the standard library, so a FROM-scratch image can check itself.

use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("only http://host:port/path URLs are supported, not {0:?}")]
    BadUrl(String),
    #[error("cannot reach {address}: {source}")]
    Unreachable { address: String, source: std::io::Error },
    #[error("answered {0:?}")]
    Unhealthy(String),
}

/// Succeeds when `url` answers HTTP 200 within `timeout`.
pub fn probe(url: &str, timeout: Duration) -> Result<(), HealthError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| HealthError::BadUrl(url.to_owned()))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let unreachable = |source| HealthError::Unreachable { address: authority.to_owned(), source };
    let address =
        authority.to_socket_addrs().map_err(unreachable)?.next().ok_or_else(|| HealthError::BadUrl(url.to_owned()))?;
    let mut stream = TcpStream::connect_timeout(&address, timeout).map_err(unreachable)?;
    stream.set_read_timeout(Some(timeout)).map_err(unreachable)?;
    stream.set_write_timeout(Some(timeout)).map_err(unreachable)?;
    // One write: the request must not arrive in pieces a simple server misreads.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(unreachable)?;
    let mut answer = Vec::new();
    // The status line is all that matters; a short read is enough.
    let mut buffer = [0u8; 512];
    while !answer.contains(&b'\n') {
        let read = stream.read(&mut buffer).map_err(unreachable)?;
        if read == 0 {
            break;
        }
        answer.extend_from_slice(&buffer[..read]);
    }
    let status_line = String::from_utf8_lossy(&answer).lines().next().unwrap_or_default().to_owned();
    match status_line.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        _ => Err(HealthError::Unhealthy(status_line)),
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    fn serve_once(reply: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            // Until the end of the headers, however the request was split.
            let (mut request, mut buffer) = (Vec::new(), [0u8; 256]);
            while !request.ends_with(b"\r\n\r\n") {
                let read = stream.read(&mut buffer).unwrap();
                assert!(read > 0, "the request ended early: {:?}", String::from_utf8_lossy(&request));
                request.extend_from_slice(&buffer[..read]);
            }
            assert!(String::from_utf8_lossy(&request).starts_with("GET /health HTTP/1.0\r\n"));
            stream.write_all(reply.as_bytes()).unwrap();
        });
        format!("http://{address}/health")
    }

    #[test]
    fn healthy_only_on_200() {
        let timeout = Duration::from_secs(2);
        assert!(probe(&serve_once("HTTP/1.1 200 OK\r\n\r\nok"), timeout).is_ok());
        let sick = probe(&serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\n"), timeout).unwrap_err();
        assert!(sick.to_string().contains("503"), "{sick}");
        let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(matches!(probe(&format!("http://{closed}/health"), timeout), Err(HealthError::Unreachable { .. })));
        assert!(matches!(probe("https://example.com/", timeout), Err(HealthError::BadUrl(_))));
    }
}
