//! TLS plumbing of the router; the certificates themselves are `deepseek_proto::tls`'s.
//! Clients reach the HTTP front through [`TlsListener`] (axum's side of the accept loop), and
//! the router reaches workers that want mutual TLS through [`WorkerConnector`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use deepseek_proto::tls::{Identity, TlsConnection};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tonic::transport::Uri;

/// The handshaken connections of `deepseek_proto::tls::accept`, as axum takes connections.
pub struct TlsListener {
    pub connections: mpsc::Receiver<TlsConnection>,
    pub local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TlsConnection, SocketAddr) {
        match self.connections.recv().await {
            Some(connection) => {
                let remote = connection.remote;
                (connection, remote)
            }
            // The accept task never ends while the listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Opens a backend channel's connections over mutual TLS: the router's certificate out, the
/// worker's checked against the deployment's CA (by chain, not by name: workers answer on
/// pod addresses).
#[derive(Clone, Debug)]
pub struct WorkerConnector {
    /// The router's certificate and the CA; `serve` keeps them current.
    pub identity: Arc<Identity>,
    config: Arc<ClientConfig>,
}

impl WorkerConnector {
    /// A connector presenting `identity`, or `None` when it has no CA to check workers by.
    pub fn new(identity: Arc<Identity>) -> Option<Self> {
        let config = identity.client_config(&[b"h2"])?;
        Some(WorkerConnector { identity, config })
    }
}

/// The name sent in the handshake; workers serve one certificate whatever it is.
const SERVER_NAME: &str = "deepseek-worker";

impl tower_service::Service<Uri> for WorkerConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(SERVER_NAME).expect("a valid DNS name");
            Ok(TokioIo::new(connector.connect(name, tcp).await?))
        })
    }
}
