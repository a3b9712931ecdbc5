//! Byte-level proxies a test puts between Flotilla and a service (the Docker
//! socket, PostgreSQL) to make the service unreachable and bring it back,
//! without touching the real service other tests use.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::task::JoinSet;

/// Where a proxy listens.
#[derive(Debug, Clone)]
enum Front {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// Where a proxy forwards to.
#[derive(Debug, Clone)]
enum Back {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// A proxy that can be cut (listener closed, every connection dropped) and
/// restored on the same address.
pub struct Proxy {
    front: Front,
    back: Back,
    tasks: Arc<Mutex<Option<JoinSet<()>>>>,
}

impl Proxy {
    /// A Unix socket at `path` forwarding to the Unix socket `target`.
    pub async fn unix(path: &Path, target: &Path) -> Self {
        let proxy = Self {
            front: Front::Unix(path.to_owned()),
            back: Back::Unix(target.to_owned()),
            tasks: Arc::new(Mutex::new(None)),
        };
        proxy.restore().await;
        proxy
    }

    /// A TCP port on loopback forwarding to `target`.
    pub async fn tcp(target: SocketAddr) -> Self {
        Self::tcp_on(std::net::Ipv4Addr::LOCALHOST.into(), target).await
    }

    /// A TCP port on `ip` (an address of this host, such as a Docker bridge's
    /// gateway that containers reach) forwarding to `target`.
    pub async fn tcp_on(ip: std::net::IpAddr, target: SocketAddr) -> Self {
        let probe = TcpListener::bind((ip, 0)).await.expect("a free port");
        let address = probe.local_addr().expect("address");
        drop(probe);
        let proxy = Self { front: Front::Tcp(address), back: Back::Tcp(target), tasks: Arc::new(Mutex::new(None)) };
        proxy.restore().await;
        proxy
    }

    pub fn tcp_address(&self) -> SocketAddr {
        match &self.front {
            Front::Tcp(address) => *address,
            Front::Unix(_) => panic!("not a TCP proxy"),
        }
    }

    /// Stops listening and drops every open connection.
    pub fn cut(&self) {
        if let Some(mut tasks) = self.tasks.lock().expect("proxy lock").take() {
            tasks.abort_all();
        }
        if let Front::Unix(path) = &self.front {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Listens again on the same address.
    pub async fn restore(&self) {
        self.cut();
        let mut tasks = JoinSet::new();
        let back = self.back.clone();
        // Dropping an accept loop drops its JoinSet of connections, which
        // aborts them: cutting the loop cuts every connection.
        match &self.front {
            Front::Unix(path) => {
                let listener = UnixListener::bind(path).expect("bind the proxy socket");
                tasks.spawn(async move {
                    let mut open = JoinSet::new();
                    while let Ok((client, _)) = listener.accept().await {
                        open.spawn(forward(client, back.clone()));
                    }
                });
            }
            Front::Tcp(address) => {
                let listener = bind_retrying(*address).await;
                tasks.spawn(async move {
                    let mut open = JoinSet::new();
                    while let Ok((client, _)) = listener.accept().await {
                        open.spawn(forward(client, back.clone()));
                    }
                });
            }
        }
        *self.tasks.lock().expect("proxy lock") = Some(tasks);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// The port was just released by `cut`; the kernel may need a moment.
async fn bind_retrying(address: SocketAddr) -> TcpListener {
    for _ in 0..50 {
        if let Ok(listener) = TcpListener::bind(address).await {
            return listener;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("cannot bind the proxy to {address} again");
}

async fn forward<C>(mut client: C, back: Back)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    match back {
        Back::Unix(path) => {
            if let Ok(mut server) = UnixStream::connect(&path).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
        }
        Back::Tcp(address) => {
            if let Ok(mut server) = TcpStream::connect(address).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
        }
    }
}
