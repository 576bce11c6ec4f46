//! TLS on the client-facing listeners. The certificate and key come from PEM files that are
//! read again when they change (a mounted Secret that cert-manager renews), so a rotation
//! needs no restart: handshakes after it present the new certificate, connections open
//! before it go on. Handshakes run beside the accept loop, each with a deadline, so a slow
//! or garbage-sending client holds up no one else.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client may take to finish its handshake.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// Handshaken connections waiting for the server to take them.
const ACCEPTED_BACKLOG: usize = 64;

/// The PEM files of the serving certificate (chain first, leaf first) and its key.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The certificate handshakes present now; `reload` swaps it.
#[derive(Debug)]
pub struct ServingCert {
    files: TlsFiles,
    loaded: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    /// The files' bytes it was made from, to tell a change.
    pem: (Vec<u8>, Vec<u8>),
    key: Arc<CertifiedKey>,
}

impl ServingCert {
    /// Reads the files; an error names the file and what is wrong with it.
    pub fn load(files: TlsFiles) -> Result<Self, String> {
        let pem = read_pair(&files)?;
        let key = Arc::new(certified_key(&files, &pem)?);
        Ok(ServingCert {
            files,
            loaded: RwLock::new(Loaded { pem, key }),
        })
    }

    /// Reads the files again and serves them if they changed and are valid. A pair caught
    /// half-written (a key that does not match the certificate) keeps the old one until
    /// the next call. Returns whether the certificate changed.
    pub fn reload(&self) -> Result<bool, String> {
        let pem = read_pair(&self.files)?;
        if self.loaded.read().expect("not poisoned").pem == pem {
            return Ok(false);
        }
        let key = Arc::new(certified_key(&self.files, &pem)?);
        *self.loaded.write().expect("not poisoned") = Loaded { pem, key };
        Ok(true)
    }

    /// Reloads every `interval`, logging what happens, until the process ends.
    pub async fn follow(self: Arc<Self>, interval: Duration) {
        loop {
            tokio::time::sleep(interval).await;
            match self.reload() {
                Ok(true) => {
                    tracing::info!(cert = %self.files.cert.display(), "serving a new certificate")
                }
                Ok(false) => {}
                Err(err) => tracing::warn!(error = %err, "keeping the current certificate"),
            }
        }
    }

    /// A server configuration presenting this certificate, offering `alpn` protocols.
    pub fn server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.loaded.read().expect("not poisoned").key.clone())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pair(files: &TlsFiles) -> Result<(Vec<u8>, Vec<u8>), String> {
    let read = |flag: &str, path: &Path| {
        std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
    };
    Ok((
        read("--tls-cert", &files.cert)?,
        read("--tls-key", &files.key)?,
    ))
}

fn certified_key(
    files: &TlsFiles,
    (cert, key): &(Vec<u8>, Vec<u8>),
) -> Result<CertifiedKey, String> {
    let cert_file = files.cert.display();
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("--tls-cert {cert_file}: {e}"))?;
    if chain.is_empty() {
        return Err(format!("--tls-cert {cert_file}: no PEM certificate in it"));
    }
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| format!("--tls-key {}: {e}", files.key.display()))?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        format!(
            "--tls-key {} does not serve --tls-cert {cert_file}: {e}",
            files.key.display()
        )
    })
}

/// A TLS connection from a client, with the addresses tonic reports for plain TCP.
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    remote: SocketAddr,
}

/// Accepts TCP connections on `listener` and hands on those whose handshake completes.
pub fn accept(listener: TcpListener, config: Arc<ServerConfig>) -> mpsc::Receiver<TlsConnection> {
    let (tx, rx) = mpsc::channel(ACCEPTED_BACKLOG);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(TlsConnection { stream, remote }).await;
                    }
                    Ok(Err(err)) => tracing::debug!(%remote, error = %err, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}

/// The handshaken connections of [`accept`], as axum takes connections.
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

impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.stream.get_ref().0.local_addr().ok(),
            remote_addr: Some(self.remote),
        }
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tls")
            .join(name)
    }

    /// A certificate pair in a directory of its own, to rewrite.
    fn pair_in(dir: &Path, name: &str) -> TlsFiles {
        let files = TlsFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        };
        std::fs::copy(fixture(&format!("{name}.crt")), &files.cert).unwrap();
        std::fs::copy(fixture(&format!("{name}.key")), &files.key).unwrap();
        files
    }

    fn serving_leaf(cert: &ServingCert) -> Vec<u8> {
        let loaded = cert.loaded.read().unwrap();
        loaded.key.end_entity_cert().unwrap().to_vec()
    }

    #[test]
    fn errors_name_the_flag_and_the_file() {
        let missing = TlsFiles {
            cert: fixture("none.crt"),
            key: fixture("router-a.key"),
        };
        let err = ServingCert::load(missing).unwrap_err();
        assert!(
            err.starts_with("--tls-cert ") && err.contains("none.crt"),
            "{err}"
        );

        let not_pem = TlsFiles {
            cert: fixture("make.sh"),
            key: fixture("router-a.key"),
        };
        let err = ServingCert::load(not_pem).unwrap_err();
        assert!(err.contains("no PEM certificate"), "{err}");

        let mismatched = TlsFiles {
            cert: fixture("router-a.crt"),
            key: fixture("router-b.key"),
        };
        let err = ServingCert::load(mismatched).unwrap_err();
        assert!(
            err.contains("router-b.key does not serve --tls-cert"),
            "{err}"
        );
    }

    #[test]
    fn a_renewed_pair_is_served_and_a_half_written_one_is_not() {
        let dir = std::env::temp_dir().join(format!("dsd-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = pair_in(&dir, "router-a");
        let cert = ServingCert::load(files.clone()).unwrap();
        let first = serving_leaf(&cert);
        assert_eq!(cert.reload(), Ok(false));

        // The certificate is renewed before its key: the old pair stays until both are.
        std::fs::copy(fixture("router-b.crt"), &files.cert).unwrap();
        assert!(cert.reload().unwrap_err().contains("does not serve"));
        assert_eq!(serving_leaf(&cert), first);
        std::fs::copy(fixture("router-b.key"), &files.key).unwrap();
        assert_eq!(cert.reload(), Ok(true));
        assert_ne!(serving_leaf(&cert), first);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
