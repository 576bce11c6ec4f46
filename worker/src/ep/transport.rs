//! What carries a group's all-to-alls: channels between ranks in one process, or a TCP mesh
//! between processes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

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
const HELLO_VERSION: u32 = 1;

/// Ranks in different processes: a full mesh of TCP connections, one length-prefixed frame
/// per message. Each peer has a writer thread, so a rank never blocks sending while its
/// peer blocks sending to it; reads wait at most `stall_timeout`.
pub struct TcpTransport {
    rank: usize,
    peers: Vec<String>,
    identity: u64,
    connect_timeout: Duration,
    stall_timeout: Duration,
    links: Mutex<Links>,
}

/// The live connections of a rank, one per peer (None for itself).
struct Links {
    /// `writers[d]` queues frames for rank `d`.
    writers: Vec<Option<Sender<Vec<u8>>>>,
    /// `readers[s]` reads frames from rank `s`.
    readers: Vec<Option<TcpStream>>,
}

impl TcpTransport {
    /// Joins the group: listens on `peers[rank]`, dials every lower rank (retrying until
    /// `connect_timeout`) and accepts every higher one. Each connection opens with a hello
    /// (rank, group size, identity); a peer with another model or plan is refused.
    pub fn connect(
        rank: usize,
        peers: &[String],
        identity: u64,
        connect_timeout: Duration,
        stall_timeout: Duration,
    ) -> Result<Self> {
        let transport = TcpTransport {
            rank,
            peers: peers.to_vec(),
            identity,
            connect_timeout,
            stall_timeout,
            links: Mutex::new(Links {
                writers: Vec::new(),
                readers: Vec::new(),
            }),
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
        let listener = self.listen()?;
        let deadline = Instant::now() + self.connect_timeout;
        let mut streams: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
        // One connection per pair: the higher rank dials, the lower one accepts.
        for (peer, addr) in self.peers.iter().enumerate().take(rank) {
            let mut stream = dial(peer, addr, deadline)?;
            stream.set_nodelay(true)?;
            self.send_hello(&mut stream)?;
            check_hello(
                &mut stream,
                Some(peer),
                size,
                self.identity,
                self.connect_timeout,
            )?;
            streams[peer] = Some(stream);
        }
        self.accept_higher_ranks(&listener, deadline, &mut streams)?;
        start_links(streams, self.stall_timeout)
    }

    /// Listens on every interface, on this rank's port: its entry may be a name (a pod's DNS
    /// name) that resolves to an address the process cannot bind by name.
    fn listen(&self) -> Result<TcpListener> {
        let own = &self.peers[self.rank];
        let port = own
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .with_context(|| format!("peer address {own:?} has no port"))?;
        TcpListener::bind(("0.0.0.0", port))
            .with_context(|| format!("listening for peers on port {port}"))
    }

    /// This rank's hello: magic, version, rank, group size, identity.
    fn send_hello(&self, stream: &mut TcpStream) -> Result<()> {
        let mut frame = HELLO_MAGIC.to_vec();
        for v in [HELLO_VERSION, self.rank as u32, self.peers.len() as u32] {
            put_u32(&mut frame, v);
        }
        frame.extend_from_slice(&self.identity.to_le_bytes());
        write_frame(stream, &frame)?;
        Ok(())
    }

    /// Accepts every higher rank once, each checked by its hello, until `deadline`.
    fn accept_higher_ranks(
        &self,
        listener: &TcpListener,
        deadline: Instant,
        streams: &mut [Option<TcpStream>],
    ) -> Result<()> {
        let (rank, size, timeout) = (self.rank, self.peers.len(), self.connect_timeout);
        listener.set_nonblocking(true)?;
        while streams[rank + 1..].iter().any(Option::is_none) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nonblocking(false)?;
                    stream.set_nodelay(true)?;
                    let peer = check_hello(&mut stream, None, size, self.identity, timeout)?;
                    if peer <= rank || streams[peer].is_some() {
                        bail!("rank {peer} connected twice or out of turn");
                    }
                    self.send_hello(&mut stream)?;
                    streams[peer] = Some(stream);
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> =
                            (rank + 1..size).filter(|&p| streams[p].is_none()).collect();
                        bail!("ranks {missing:?} did not join within {timeout:?}");
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(err) => return Err(err.into()),
            }
        }
        Ok(())
    }
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

/// The links over a full mesh's streams (None for this rank): reads time out after
/// `stall_timeout`, and each peer gets a writer thread.
fn start_links(streams: Vec<Option<TcpStream>>, stall_timeout: Duration) -> Result<Links> {
    let mut writers = Vec::with_capacity(streams.len());
    let mut readers = Vec::with_capacity(streams.len());
    for stream in streams {
        let Some(stream) = stream else {
            writers.push(None);
            readers.push(None);
            continue;
        };
        stream.set_read_timeout(Some(stall_timeout))?;
        writers.push(Some(spawn_writer(stream.try_clone()?)?));
        readers.push(Some(stream));
    }
    Ok(Links { writers, readers })
}

/// A thread that writes the frames sent to it, in order, until the channel or the
/// connection closes.
fn spawn_writer(mut writer: TcpStream) -> Result<Sender<Vec<u8>>> {
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

/// Reads a peer's hello and checks it against this group; returns the peer's rank.
fn check_hello(
    stream: &mut TcpStream,
    expected: Option<usize>,
    size: usize,
    identity: u64,
    timeout: Duration,
) -> Result<usize> {
    stream.set_read_timeout(Some(timeout))?;
    let frame = read_frame(stream).context("reading a peer's hello")?;
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

    fn free_addrs(n: usize) -> Vec<String> {
        let listeners: Vec<_> = (0..n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        listeners
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect()
    }

    #[test]
    fn tcp_ranks_form_a_mesh_and_exchange_all_to_all() {
        let peers = free_addrs(3);
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let peers = peers.clone();
                std::thread::spawn(move || {
                    let t = TcpTransport::connect(
                        rank,
                        &peers,
                        7,
                        Duration::from_secs(10),
                        Duration::from_secs(10),
                    )
                    .unwrap();
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
        let rank1 =
            std::thread::spawn(move || TcpTransport::connect(1, &other, 2, short, short).err());
        let rank0 = TcpTransport::connect(0, &peers, 1, short, short).err();
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
