//! What carries a group's all-to-alls: channels between ranks in one process, or a TCP mesh
//! between processes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deepseek_proto::tls::Identity;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection, StreamOwned};

use super::GroupError;
use super::wire::{get_u32, put_u32};
use crate::bail;
use crate::error::{Context, Result};

/// All-to-all among the ranks of a group.
pub trait Transport: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Sends `outgoing[d]` to rank `d` (this rank included) and returns what every rank sent
    /// here, `incoming[s]` from rank `s`. Returns once every rank's message has arrived.
    fn all_to_all(&self, outgoing: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>>;

    /// After a failure: drops every connection and forms the group again, waiting for the
    /// missing ranks to come back (within the transport's own timeout).
    fn rejoin(&self) -> Result<()> {
        Err(GroupError("this transport cannot re-form its group".into()).into())
    }
}

/// Ranks in one process, connected by channels (tests, and groups on one host).
pub struct ChannelTransport {
    rank: usize,
    /// `to[d]` reaches rank `d`.
    to: Vec<Sender<Vec<u8>>>,
    /// `from[s]` hears rank `s`.
    from: Mutex<Vec<Receiver<Vec<u8>>>>,
}

impl ChannelTransport {
    /// A connected group of `size` ranks, in rank order.
    pub fn group(size: usize) -> Vec<ChannelTransport> {
        // links[s][d]: rank s → rank d
        let mut senders: Vec<Vec<Sender<Vec<u8>>>> = Vec::new();
        let mut receivers: Vec<Vec<Option<Receiver<Vec<u8>>>>> = (0..size)
            .map(|_| (0..size).map(|_| None).collect())
            .collect();
        for s in 0..size {
            let mut row = Vec::new();
            for receivers_of_d in receivers.iter_mut() {
                let (tx, rx) = channel();
                row.push(tx);
                receivers_of_d[s] = Some(rx);
            }
            senders.push(row);
        }
        senders
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(rank, (to, from))| ChannelTransport {
                rank,
                to,
                from: Mutex::new(from.into_iter().map(|r| r.expect("every link")).collect()),
            })
            .collect()
    }
}

impl Transport for ChannelTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.to.len()
    }

    fn all_to_all(&self, outgoing: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        if outgoing.len() != self.size() {
            bail!("all_to_all needs one message per rank");
        }
        let gone = || GroupError("a rank of the group has gone".into());
        for (to, message) in self.to.iter().zip(outgoing) {
            to.send(message).map_err(|_| gone())?;
        }
        let from = self.from.lock().unwrap_or_else(|p| p.into_inner());
        Ok(from
            .iter()
            .map(|r| r.recv().map_err(|_| gone()))
            .collect::<Result<_, _>>()?)
    }
}

const HELLO_MAGIC: &[u8; 4] = b"DSEP";
const HELLO_VERSION: u32 = 2;

/// ALPN of the expert-parallel links over TLS.
const ALPN: &[u8] = b"dsd-ep/2";

/// Ranks in different processes: a full mesh of TCP connections, one length-prefixed frame
/// per message, over mutual TLS when the rank has a certificate. Two connections per pair,
/// one each way: a rank dials every peer to send to it and accepts every peer to hear from
/// it, so no stream is both read and written (a TLS session cannot be split between a
/// reading and a writing thread). Each peer has a writer thread, so a rank never blocks
/// sending while its peer blocks sending to it; reads wait at most `stall_timeout`.
pub struct TcpTransport {
    rank: usize,
    peers: Vec<String>,
    identity: u64,
    connect_timeout: Duration,
    stall_timeout: Duration,
    tls: Option<LinkTls>,
    links: Mutex<Links>,
    /// The listener bound before loading (see `listen_for_peers`), for the first mesh;
    /// every later one binds afresh, so no connection of a failed mesh lingers.
    first_listener: Mutex<Option<TcpListener>>,
}

/// Mutual TLS on every link: peers present certificates the group's CA signed.
#[derive(Clone)]
struct LinkTls {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

/// The live connections of a rank, one per peer (None for itself).
struct Links {
    /// `writers[d]` queues frames for rank `d`.
    writers: Vec<Option<Sender<Vec<u8>>>>,
    /// `readers[s]` reads frames from rank `s`.
    readers: Vec<Option<Link>>,
}

/// One way of a link: a plain TCP stream, or TLS as the end that dialed or accepted.
enum Link {
    Plain(TcpStream),
    Dialed(Box<StreamOwned<ClientConnection, TcpStream>>),
    Accepted(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Link {
    fn tcp(&self) -> &TcpStream {
        match self {
            Link::Plain(s) => s,
            Link::Dialed(s) => s.get_ref(),
            Link::Accepted(s) => s.get_ref(),
        }
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Link::Plain(s) => s.read(buf),
            Link::Dialed(s) => s.read(buf),
            Link::Accepted(s) => s.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Link::Plain(s) => s.write(buf),
            Link::Dialed(s) => s.write(buf),
            Link::Accepted(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Link::Plain(s) => s.flush(),
            Link::Dialed(s) => s.flush(),
            Link::Accepted(s) => s.flush(),
        }
    }
}

/// What a rank checks a peer's hello against.
#[derive(Clone, Copy)]
struct Group {
    rank: usize,
    size: usize,
    identity: u64,
    timeout: Duration,
}

impl TcpTransport {
    /// Joins the group: accepts on `listener` (bound on `peers[rank]`'s port by
    /// `listen_for_peers`), dials every peer (retrying until `connect_timeout`) and accepts
    /// every peer. Each connection opens with a hello each way (rank, group size,
    /// identity); a peer with another model or plan is refused. With `tls` (this rank's
    /// certificate and the CA), every link is mutual TLS and a peer without a certificate
    /// the CA signed is refused.
    pub fn connect(
        listener: TcpListener,
        rank: usize,
        peers: &[String],
        identity: u64,
        connect_timeout: Duration,
        stall_timeout: Duration,
        tls: Option<&Arc<Identity>>,
    ) -> Result<Self> {
        let tls = match tls {
            None => None,
            Some(tls) => Some(LinkTls {
                client: tls.client_config(&[ALPN]).context(
                    "expert-parallel links over TLS need the CA peers' certificates chain to (--tls-client-ca)",
                )?,
                server: tls.server_config(&[ALPN]),
            }),
        };
        let transport = TcpTransport {
            rank,
            peers: peers.to_vec(),
            identity,
            connect_timeout,
            stall_timeout,
            tls,
            links: Mutex::new(Links {
                writers: Vec::new(),
                readers: Vec::new(),
            }),
            first_listener: Mutex::new(Some(listener)),
        };
        *transport.links.lock().unwrap_or_else(|p| p.into_inner()) = transport.mesh()?;
        Ok(transport)
    }

    /// Connects to every peer afresh.
    fn mesh(&self) -> Result<Links> {
        let (rank, size) = (self.rank, self.peers.len());
        if rank >= size {
            bail!("rank {rank} is not in a group of {size}");
        }
        let group = Group {
            rank,
            size,
            identity: self.identity,
            timeout: self.connect_timeout,
        };
        let first = self
            .first_listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let listener = match first {
            Some(listener) => listener,
            None => listen_for_peers(&self.peers, rank)?,
        };
        let deadline = Instant::now() + self.connect_timeout;
        let stop = Arc::new(AtomicBool::new(false));
        let accepting = {
            let (server, stop) = (self.tls.as_ref().map(|t| t.server.clone()), stop.clone());
            std::thread::spawn(move || accept_peers(&listener, group, server, deadline, &stop))
        };
        let dialed = self.dial_peers(group, deadline);
        if dialed.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        let accepted = accepting
            .join()
            .expect("the accepting thread does not panic");
        let (dialed, accepted) = match (dialed, accepted) {
            (Ok(dialed), Ok(accepted)) => (dialed, accepted),
            // Whichever side first saw what is wrong (a hello, a certificate) says it.
            (Err(to), Err(from)) => bail!("dialing peers: {to:#}; accepting peers: {from:#}"),
            (Err(err), _) | (_, Err(err)) => return Err(err),
        };
        let (mut writers, mut readers) = (Vec::with_capacity(size), Vec::with_capacity(size));
        for (to, from) in dialed.into_iter().zip(accepted) {
            // A peer that stops reading or writing is a failed peer, not a hung thread.
            if let Some(from) = &from {
                from.tcp().set_read_timeout(Some(self.stall_timeout))?;
            }
            if let Some(to) = &to {
                to.tcp().set_write_timeout(Some(self.stall_timeout))?;
            }
            writers.push(to.map(spawn_writer).transpose()?);
            readers.push(from);
        }
        Ok(Links { writers, readers })
    }

    /// A link to every peer, hellos exchanged, for sending.
    fn dial_peers(&self, group: Group, deadline: Instant) -> Result<Vec<Option<Link>>> {
        let mut links = Vec::with_capacity(group.size);
        for (peer, addr) in self.peers.iter().enumerate() {
            if peer == group.rank {
                links.push(None);
                continue;
            }
            let stream = dial(peer, addr, deadline)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(group.timeout))?;
            let mut link = match &self.tls {
                None => Link::Plain(stream),
                Some(tls) => {
                    let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
                    let name = ServerName::try_from(host.to_string())
                        .map_err(|e| GroupError(format!("peer address {addr:?}: {e}")))?;
                    let session = ClientConnection::new(tls.client.clone(), name)
                        .map_err(|e| GroupError(format!("TLS to rank {peer}: {e}")))?;
                    Link::Dialed(Box::new(StreamOwned::new(session, stream)))
                }
            };
            send_hello(&mut link, group)
                .with_context(|| format!("greeting rank {peer} at {addr}"))?;
            check_hello(&mut link, Some(peer), group)?;
            links.push(Some(link));
        }
        Ok(links)
    }
}

/// Listens for rank `rank`'s peers on every interface, on its port in `peers`: its entry
/// may be a name (a pod's DNS name) that resolves to an address the process cannot bind by
/// name. Bound before the rank loads, so its peers' `check_peers_answer` finds it.
pub fn listen_for_peers(peers: &[String], rank: usize) -> Result<TcpListener> {
    let own = peers
        .get(rank)
        .with_context(|| format!("rank {rank} is not in a group of {}", peers.len()))?;
    let port = own
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .with_context(|| format!("peer address {own:?} has no port"))?;
    TcpListener::bind(("0.0.0.0", port))
        .with_context(|| format!("listening for peers on port {port}"))
}

/// Preflight, before a rank loads anything: every peer's expert-parallel port accepts a
/// connection within `timeout` (each peer binds it first thing, see `listen_for_peers`).
/// The connections close at once, unused; a rank's mesh skips them.
pub fn check_peers_answer(peers: &[String], rank: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for (peer, addr) in peers.iter().enumerate().filter(|&(p, _)| p != rank) {
        dial(peer, addr, deadline).with_context(|| {
            format!(
                "preflight: rank {rank} needs every rank of its group within {timeout:?} \
                 (--ep-connect-timeout-seconds) before it loads"
            )
        })?;
    }
    Ok(())
}

/// Accepts every peer once, each checked by its hello, until `deadline` (or `stop`): the
/// links to read from, with reads timing out after the group's stall timeout later.
fn accept_peers(
    listener: &TcpListener,
    group: Group,
    tls: Option<Arc<ServerConfig>>,
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<Vec<Option<Link>>> {
    let mut links: Vec<Option<Link>> = (0..group.size).map(|_| None).collect();
    listener.set_nonblocking(true)?;
    while (0..group.size).any(|p| p != group.rank && links[p].is_none()) {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                stream.set_nodelay(true)?;
                stream.set_read_timeout(Some(group.timeout))?;
                // A peer's preflight (or a dial it gave up) closes without a word: no link.
                if stream.peek(&mut [0u8])? == 0 {
                    continue;
                }
                let mut link = match &tls {
                    None => Link::Plain(stream),
                    Some(config) => {
                        let session = ServerConnection::new(config.clone())
                            .map_err(|e| GroupError(format!("TLS from a peer: {e}")))?;
                        Link::Accepted(Box::new(StreamOwned::new(session, stream)))
                    }
                };
                let peer = check_hello(&mut link, None, group)?;
                if peer == group.rank || links[peer].is_some() {
                    bail!("rank {peer} connected twice");
                }
                send_hello(&mut link, group)?;
                links[peer] = Some(link);
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                if stop.load(Ordering::Relaxed) {
                    bail!("stopped: this rank could not reach its peers");
                }
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (0..group.size)
                        .filter(|&p| p != group.rank && links[p].is_none())
                        .collect();
                    bail!("ranks {missing:?} did not join within {:?}", group.timeout);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(links)
}

/// Dials rank `peer` at `addr`, retrying until `deadline` while it starts up.
fn dial(peer: usize, addr: &str, deadline: Instant) -> Result<TcpStream> {
    loop {
        match TcpStream::connect(addr) {
            Ok(stream) => return Ok(stream),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(err) => bail!("rank {peer} at {addr} did not answer: {err}"),
        }
    }
}

/// A thread that writes the frames sent to it, in order, until the channel or the
/// connection closes.
fn spawn_writer(mut writer: Link) -> Result<Sender<Vec<u8>>> {
    let (tx, rx) = channel::<Vec<u8>>();
    std::thread::Builder::new()
        .name("ep-writer".into())
        .spawn(move || {
            while let Ok(frame) = rx.recv() {
                if write_frame(&mut writer, &frame).is_err() {
                    return;
                }
            }
        })?;
    Ok(tx)
}

/// This rank's hello: magic, version, rank, group size, identity.
fn send_hello(link: &mut Link, group: Group) -> Result<()> {
    let mut frame = HELLO_MAGIC.to_vec();
    for v in [HELLO_VERSION, group.rank as u32, group.size as u32] {
        put_u32(&mut frame, v);
    }
    frame.extend_from_slice(&group.identity.to_le_bytes());
    write_frame(link, &frame)?;
    link.flush()?;
    Ok(())
}

/// Reads a peer's hello and checks it against this group; returns the peer's rank.
fn check_hello(link: &mut Link, expected: Option<usize>, group: Group) -> Result<usize> {
    let Group { size, identity, .. } = group;
    let frame = read_frame(link).context("reading a peer's hello")?;
    let mut bytes = frame.as_slice();
    if bytes.len() != 24 || &bytes[..4] != HELLO_MAGIC {
        bail!("a peer spoke something other than the expert-parallel protocol");
    }
    bytes = &bytes[4..];
    let (version, peer, peer_size) = (
        get_u32(&mut bytes)?,
        get_u32(&mut bytes)?,
        get_u32(&mut bytes)?,
    );
    let peer_identity = u64::from_le_bytes(bytes.try_into().expect("8 bytes left"));
    let peer = peer as usize;
    if version != HELLO_VERSION {
        bail!("rank {peer} speaks protocol version {version}, this rank {HELLO_VERSION}");
    }
    if peer_size as usize != size || expected.is_some_and(|e| e != peer) || peer >= size {
        bail!(
            "rank {peer} of a group of {peer_size} answered where rank {expected:?} of {size} was expected"
        );
    }
    if peer_identity != identity {
        bail!(
            "rank {peer} serves a different model or placement plan (identity {peer_identity:016x}, \
             this rank {identity:016x}); every rank of a group needs the same checkpoint and plan"
        );
    }
    Ok(peer)
}

fn write_frame(stream: &mut impl Write, frame: &[u8]) -> std::io::Result<()> {
    stream.write_all(&(frame.len() as u64).to_le_bytes())?;
    stream.write_all(frame)
}

fn read_frame(stream: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    stream.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    // A frame is one layer's tokens for this rank; anything near this is corruption.
    if len > 1 << 34 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a {len}-byte frame"),
        ));
    }
    let mut frame = vec![0u8; len as usize];
    stream.read_exact(&mut frame)?;
    Ok(frame)
}

impl Transport for TcpTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.peers.len()
    }

    fn all_to_all(&self, outgoing: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if outgoing.len() != self.size() || links.writers.len() != self.size() {
            return Err(GroupError("not connected to every rank of the group".into()).into());
        }
        let mut own = Vec::new();
        for (d, message) in outgoing.into_iter().enumerate() {
            match &links.writers[d] {
                Some(writer) => writer
                    .send(message)
                    .map_err(|_| GroupError(format!("the connection to rank {d} is closed")))?,
                None => own = message,
            }
        }
        let mut incoming = Vec::with_capacity(self.size());
        for (s, reader) in links.readers.iter_mut().enumerate() {
            incoming.push(match reader {
                Some(stream) => read_frame(stream)
                    .map_err(|e| GroupError(format!("rank {s} stalled or went away: {e}")))?,
                None => std::mem::take(&mut own),
            });
        }
        Ok(incoming)
    }

    fn rejoin(&self) -> Result<()> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        // Close every old connection first, so peers see this rank leave and rejoin too.
        *links = Links {
            writers: Vec::new(),
            readers: Vec::new(),
        };
        *links = self.mesh()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Binds rank `rank`'s port and joins, as a rank does; `timeout` for connecting and
    /// for stalls.
    fn connect(
        rank: usize,
        peers: &[String],
        identity: u64,
        timeout: Duration,
        tls: Option<&Arc<Identity>>,
    ) -> Result<TcpTransport> {
        let listener = listen_for_peers(peers, rank)?;
        TcpTransport::connect(listener, rank, peers, identity, timeout, timeout, tls)
    }

    #[test]
    fn preflight_names_the_rank_that_does_not_answer() {
        let peers = free_addrs(2);
        let _rank0 = listen_for_peers(&peers, 0).unwrap();
        let err = check_peers_answer(&peers, 0, Duration::from_millis(300)).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("preflight"), "{text}");
        assert!(
            text.contains(&format!("rank 1 at {} did not answer", peers[1])),
            "{text}"
        );
    }

    #[test]
    fn preflight_probes_leave_the_mesh_to_form() {
        let peers = free_addrs(2);
        let listeners: Vec<TcpListener> = (0..2)
            .map(|rank| listen_for_peers(&peers, rank).unwrap())
            .collect();
        // Each rank finds the other's port open before it would load; the probes wait,
        // closed, in the listeners' queues.
        for rank in 0..2 {
            check_peers_answer(&peers, rank, Duration::from_secs(5)).unwrap();
        }
        let second = Duration::from_secs(5);
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let peers = peers.clone();
                std::thread::spawn(move || {
                    let t = TcpTransport::connect(listener, rank, &peers, 7, second, second, None)
                        .unwrap();
                    t.all_to_all(vec![vec![rank as u8]; 2]).unwrap()
                })
            })
            .collect();
        for (rank, h) in handles.into_iter().enumerate() {
            assert_eq!(h.join().unwrap(), [[0], [1]], "rank {rank}");
        }
    }

    fn free_addrs(n: usize) -> Vec<String> {
        let listeners: Vec<_> = (0..n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        listeners
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect()
    }

    /// A test certificate (`tests/fixtures/tls`) and the CA peers must chain to.
    fn identity(name: &str) -> Arc<Identity> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tls");
        let files = deepseek_proto::tls::TlsFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            ca: Some(dir.join("ca.crt")),
            flags: ["--tls-cert", "--tls-key", "--tls-client-ca"],
        };
        Arc::new(Identity::load(files).unwrap())
    }

    #[test]
    fn tcp_ranks_form_a_mesh_and_exchange_all_to_all() {
        exchange_in_a_mesh_of_three(None);
    }

    #[test]
    fn tls_ranks_form_a_mesh_and_exchange_all_to_all() {
        exchange_in_a_mesh_of_three(Some(identity("router-a")));
    }

    #[test]
    fn a_rank_whose_certificate_another_ca_signed_is_refused() {
        let peers = free_addrs(2);
        let other = peers.clone();
        let short = Duration::from_secs(5);
        let stranger = identity("stranger");
        let rank1 = std::thread::spawn(move || connect(1, &other, 7, short, Some(&stranger)).err());
        let rank0 = connect(0, &peers, 7, short, Some(&identity("router-a")));
        let errors: Vec<String> = [rank0.err(), rank1.join().unwrap()]
            .into_iter()
            .flatten()
            .map(|e| format!("{e:#}"))
            .collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors.iter().any(|e| e.contains("certificate")),
            "{errors:?}"
        );
    }

    fn exchange_in_a_mesh_of_three(tls: Option<Arc<Identity>>) {
        let peers = free_addrs(3);
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let (peers, tls) = (peers.clone(), tls.clone());
                std::thread::spawn(move || {
                    let t =
                        connect(rank, &peers, 7, Duration::from_secs(10), tls.as_ref()).unwrap();
                    let me = rank as u8;
                    // Two rounds, one large, so writes overlap reads.
                    let big: Vec<Vec<u8>> = (0..3).map(|d| vec![me ^ d; 3 << 20]).collect();
                    let got = t.all_to_all(big).unwrap();
                    assert!(
                        got.iter()
                            .enumerate()
                            .all(|(s, m)| m.len() == 3 << 20 && m[0] == s as u8 ^ me)
                    );
                    t.all_to_all((0..3).map(|d| vec![me, d]).collect()).unwrap()
                })
            })
            .collect();
        for (rank, h) in handles.into_iter().enumerate() {
            let got = h.join().unwrap();
            assert_eq!(got, (0..3).map(|s| vec![s, rank as u8]).collect::<Vec<_>>());
        }
    }

    #[test]
    fn ranks_with_another_model_or_plan_refuse_to_form_a_group() {
        let peers = free_addrs(2);
        let other = peers.clone();
        let short = Duration::from_secs(5);
        let rank1 = std::thread::spawn(move || connect(1, &other, 2, short, None).err());
        let rank0 = connect(0, &peers, 1, short, None).err();
        let errors: Vec<String> = [rank0, rank1.join().unwrap()]
            .into_iter()
            .flatten()
            .map(|e| format!("{e}"))
            .collect();
        assert!(
            errors
                .iter()
                .any(|e| e.contains("different model or placement plan")),
            "{errors:?}"
        );
    }

    #[test]
    fn channel_ranks_exchange_all_to_all() {
        let group = ChannelTransport::group(3);
        let handles: Vec<_> = group
            .into_iter()
            .map(|t| {
                std::thread::spawn(move || {
                    let me = t.rank() as u8;
                    let got = t.all_to_all((0..3).map(|d| vec![me, d]).collect()).unwrap();
                    (me, got)
                })
            })
            .collect();
        for h in handles {
            let (me, got) = h.join().unwrap();
            assert_eq!(got, (0..3).map(|s| vec![s, me]).collect::<Vec<_>>());
        }
    }
}
