//! TLS for the servers (router and worker) and for the router's connections to the
//! workers, with rustls. An [`Identity`] is a certificate and key read from PEM files, and,
//! for mutual TLS, the CA its peers must chain to. The files are read again when they change
//! (a mounted Secret that cert-manager renews), so a rotation needs no restart: handshakes
//! after it use the new files, connections open before it go on. Handshakes run beside the
//! accept loop, each with a deadline, so a slow or garbage-sending client holds up no one.
//!
//! Peers are checked against the CA only, not against a name: the CA is the deployment's own
//! (a cert-manager CA issuer for it), so whatever it signed is one of the deployment's
//! processes, whichever pod address it answers on.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client may take to finish its handshake.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// Handshaken connections waiting for the server to take them.
const ACCEPTED_BACKLOG: usize = 64;

/// How often the files are read for a renewal.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// PEM files: the certificate chain (leaf first), its key, and for mutual TLS the CA the
/// peers' certificates must chain to. `flags` names them in errors.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: Option<PathBuf>,
    /// The command-line flags of `cert`, `key` and `ca`.
    pub flags: [&'static str; 3],
}

/// The certificate, key and CA handshakes use now; `reload` swaps them.
#[derive(Debug)]
pub struct Identity {
    files: TlsFiles,
    loaded: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    /// The files' bytes they were made from, to tell a change.
    pem: Vec<Vec<u8>>,
    key: Arc<CertifiedKey>,
    roots: Option<Arc<RootCertStore>>,
    /// Checks a client's certificate against `roots`.
    clients: Option<Arc<dyn ClientCertVerifier>>,
}

impl Identity {
    /// Reads the files; an error names the flag and file, and what is wrong.
    pub fn load(files: TlsFiles) -> Result<Self, String> {
        let loaded = load(&files)?;
        Ok(Identity {
            files,
            loaded: RwLock::new(loaded),
        })
    }

    /// Reads the files again and uses them if they changed and are valid. A set caught
    /// half-written (a key that does not match the certificate) keeps the old one until
    /// the next call. Returns whether anything changed.
    pub fn reload(&self) -> Result<bool, String> {
        let pem = read_all(&self.files)?;
        if self.current().pem == pem {
            return Ok(false);
        }
        *self.loaded.write().expect("not poisoned") = load(&self.files)?;
        Ok(true)
    }

    /// Reloads every `RELOAD_INTERVAL`, logging what happens, until the process ends.
    pub async fn follow(self: Arc<Self>) {
        loop {
            tokio::time::sleep(RELOAD_INTERVAL).await;
            match self.reload() {
                Ok(true) => {
                    tracing::info!(cert = %self.files.cert.display(), "using a renewed certificate")
                }
                Ok(false) => {}
                Err(err) => tracing::warn!(error = %err, "keeping the current certificate"),
            }
        }
    }

    /// A server configuration presenting this certificate, offering `alpn` protocols; with a
    /// CA, clients must present a certificate it signed.
    pub fn server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports TLS 1.2 and 1.3");
        let builder = if self.files.ca.is_some() {
            builder.with_client_cert_verifier(self.clone())
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_cert_resolver(self.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A client configuration presenting this certificate and accepting servers the CA
    /// signed (`None` without a CA: there is nothing to check a server against).
    pub fn client_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Option<Arc<ClientConfig>> {
        self.files.ca.as_ref()?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports TLS 1.2 and 1.3")
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_client_cert_resolver(self.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Some(Arc::new(config))
    }

    fn current(&self) -> std::sync::RwLockReadGuard<'_, Loaded> {
        self.loaded.read().expect("not poisoned")
    }
}

impl ResolvesServerCert for Identity {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current().key.clone())
    }
}

impl ResolvesClientCert for Identity {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for Identity {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints would borrow from the swappable CA; clients send their one certificate anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verifier = self.current().clients.clone();
        match verifier {
            Some(verifier) => verifier.verify_client_cert(end_entity, intermediates, now),
            None => Err(rustls::Error::General("no client CA".into())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for Identity {
    /// The server's chain must end at the CA; its name is not checked (see the module).
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = self.current().roots.clone();
        let roots = roots.ok_or_else(|| rustls::Error::General("no CA".into()))?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        let algorithms = provider().signature_verification_algorithms.all;
        verify_server_cert_signed_by_trust_anchor(&cert, &roots, intermediates, now, algorithms)?;
        Ok(ServerCertVerified::assertion())
    }

    // Signatures are checked the same whichever side sent them.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ClientCertVerifier::verify_tls12_signature(self, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ClientCertVerifier::verify_tls13_signature(self, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ClientCertVerifier::supported_verify_schemes(self)
    }
}

/// ring's provider, built once: handshakes ask it for every signature they check.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::LazyLock<Arc<CryptoProvider>> =
        std::sync::LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));
    PROVIDER.clone()
}

fn read_all(files: &TlsFiles) -> Result<Vec<Vec<u8>>, String> {
    let read = |flag: &str, path: &Path| {
        std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
    };
    let [cert_flag, key_flag, ca_flag] = files.flags;
    let mut pem = vec![read(cert_flag, &files.cert)?, read(key_flag, &files.key)?];
    if let Some(ca) = &files.ca {
        pem.push(read(ca_flag, ca)?);
    }
    Ok(pem)
}

fn certificates(
    flag: &str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{flag} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(chain)
}

fn load(files: &TlsFiles) -> Result<Loaded, String> {
    let pem = read_all(files)?;
    let [cert_flag, key_flag, ca_flag] = files.flags;
    let chain = certificates(cert_flag, &files.cert, &pem[0])?;
    let key = PrivateKeyDer::from_pem_slice(&pem[1])
        .map_err(|e| format!("{key_flag} {}: {e}", files.key.display()))?;
    let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        format!(
            "{key_flag} {} does not serve {cert_flag} {}: {e}",
            files.key.display(),
            files.cert.display()
        )
    })?;
    let (roots, clients) = match &files.ca {
        None => (None, None),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca_flag, ca, &pem[2])? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{ca_flag} {}: {e}", ca.display()))?;
            }
            let roots = Arc::new(roots);
            let clients = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| format!("{ca_flag} {}: {e}", ca.display()))?;
            (Some(roots), Some(clients))
        }
    };
    Ok(Loaded {
        pem,
        key: Arc::new(key),
        roots,
        clients,
    })
}

/// A TLS connection from a client, with the addresses tonic reports for plain TCP.
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    pub remote: SocketAddr,
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
            let _ = tcp.set_nodelay(true);
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

/// [`accept`]'s connections as tonic's incoming stream.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> impl tokio_stream::Stream<Item = io::Result<TlsConnection>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::ReceiverStream::new(accept(listener, config)).map(Ok)
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

    fn files(cert: PathBuf, key: PathBuf, ca: Option<PathBuf>) -> TlsFiles {
        TlsFiles {
            cert,
            key,
            ca,
            flags: ["--tls-cert", "--tls-key", "--tls-ca"],
        }
    }

    /// A certificate pair in a directory of its own, to rewrite.
    fn pair_in(dir: &Path, name: &str) -> TlsFiles {
        let files = files(dir.join("tls.crt"), dir.join("tls.key"), None);
        std::fs::copy(fixture(&format!("{name}.crt")), &files.cert).unwrap();
        std::fs::copy(fixture(&format!("{name}.key")), &files.key).unwrap();
        files
    }

    fn leaf(identity: &Identity) -> Vec<u8> {
        identity.current().key.end_entity_cert().unwrap().to_vec()
    }

    #[test]
    fn errors_name_the_flag_and_the_file() {
        let err =
            Identity::load(files(fixture("none.crt"), fixture("router-a.key"), None)).unwrap_err();
        assert!(
            err.starts_with("--tls-cert ") && err.contains("none.crt"),
            "{err}"
        );

        let err =
            Identity::load(files(fixture("make.sh"), fixture("router-a.key"), None)).unwrap_err();
        assert!(err.contains("no PEM certificate"), "{err}");

        let err = Identity::load(files(
            fixture("router-a.crt"),
            fixture("router-b.key"),
            None,
        ))
        .unwrap_err();
        assert!(
            err.contains("router-b.key does not serve --tls-cert"),
            "{err}"
        );

        let ca = Some(fixture("none-ca.crt"));
        let err = Identity::load(files(fixture("router-a.crt"), fixture("router-a.key"), ca))
            .unwrap_err();
        assert!(
            err.starts_with("--tls-ca ") && err.contains("none-ca.crt"),
            "{err}"
        );
    }

    #[test]
    fn a_renewed_pair_is_used_and_a_half_written_one_is_not() {
        let dir = std::env::temp_dir().join(format!("dsd-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = pair_in(&dir, "router-a");
        let identity = Identity::load(files.clone()).unwrap();
        let first = leaf(&identity);
        assert_eq!(identity.reload(), Ok(false));

        // The certificate is renewed before its key: the old pair stays until both are.
        std::fs::copy(fixture("router-b.crt"), &files.cert).unwrap();
        assert!(identity.reload().unwrap_err().contains("does not serve"));
        assert_eq!(leaf(&identity), first);
        std::fs::copy(fixture("router-b.key"), &files.key).unwrap();
        assert_eq!(identity.reload(), Ok(true));
        assert_ne!(leaf(&identity), first);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn peers_must_chain_to_the_ca_whatever_their_name() {
        let ca = Some(fixture("ca.crt"));
        let ours = Arc::new(
            Identity::load(files(fixture("router-a.crt"), fixture("router-a.key"), ca)).unwrap(),
        );
        let now = UnixTime::now();
        let name = ServerName::try_from("any-pod-address").unwrap();
        let signed = CertificateDer::from_pem_file(fixture("router-b.crt")).unwrap();
        let stranger = CertificateDer::from_pem_file(fixture("stranger.crt")).unwrap();
        assert!(
            ours.verify_server_cert(&signed, &[], &name, &[], now)
                .is_ok()
        );
        assert!(
            ours.verify_server_cert(&stranger, &[], &name, &[], now)
                .is_err()
        );
        assert!(ours.verify_client_cert(&signed, &[], now).is_ok());
        assert!(ours.verify_client_cert(&stranger, &[], now).is_err());
        assert!(ours.client_config(&[b"h2"]).is_some());
        // Without a CA there is no mutual TLS, and no client configuration.
        let plain = Arc::new(
            Identity::load(files(
                fixture("router-a.crt"),
                fixture("router-a.key"),
                None,
            ))
            .unwrap(),
        );
        assert!(plain.client_config(&[b"h2"]).is_none());
    }
}
