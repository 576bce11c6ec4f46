//! Expert parallelism: the ranks of a group each hold the replicated parts of the model and
//! their share of the routed experts (the placement plan's), and at every MoE layer exchange
//! tokens with one another.
//!
//! Per MoE layer, each rank:
//! 1. *dispatch*: sends every token to the ranks that own its top-k experts, one copy per
//!    destination rank (not per expert), with the experts and gate weights it wants there;
//! 2. computes, for every token it received, the gate-weighted sum of its experts here;
//! 3. *combine*: sends each sum back to the token's rank, which adds them up.
//!
//! Both exchanges are all-to-alls over a [`Transport`]: every rank takes part in every one,
//! with an empty batch if it has no tokens, so the ranks of a group step in lockstep.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use deepseek_proto::placement::PlacementPlan;

use crate::model::Model;
use crate::model::moe::{LocalExperts, RoutedExperts, Routing};

/// The group could not exchange: a peer went away, stalled, or sent garbage. Every request
/// on the group fails with it (UNAVAILABLE), unlike a failure of one request's step.
#[derive(Debug, thiserror::Error)]
#[error("expert-parallel group: {0}")]
pub struct GroupError(pub String);

impl GroupError {
    /// Whether `err` (or what caused it) is a group failure.
    pub fn is_in(err: &anyhow::Error) -> bool {
        err.chain().any(|e| e.is::<GroupError>())
    }
}

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
        bail!(GroupError("this transport cannot re-form its group".into()))
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

/// What ranks check before forming a group: the same model and plan (a hash of both).
pub fn group_identity(config_json: &[u8], plan: &PlacementPlan, wire: Wire) -> u64 {
    let plan = serde_json::to_vec(plan).unwrap_or_default();
    crate::fnv1a([config_json, &[0xff], &plan, &[wire as u8]])
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
        let (rank, peers, identity) = (self.rank, &self.peers, self.identity);
        let (connect_timeout, stall_timeout) = (self.connect_timeout, self.stall_timeout);
        let size = peers.len();
        if rank >= size {
            bail!("rank {rank} is not in a group of {size}");
        }
        // Every interface, on this rank's port: its entry may be a name (a pod's DNS name)
        // that resolves to an address the process cannot bind by name.
        let port = peers[rank]
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .with_context(|| format!("peer address {:?} has no port", peers[rank]))?;
        let listener = TcpListener::bind(("0.0.0.0", port))
            .with_context(|| format!("listening for peers on port {port}"))?;
        let deadline = Instant::now() + connect_timeout;
        let hello = |stream: &mut TcpStream| -> Result<()> {
            let mut frame = HELLO_MAGIC.to_vec();
            for v in [HELLO_VERSION, rank as u32, size as u32] {
                put_u32(&mut frame, v);
            }
            frame.extend_from_slice(&identity.to_le_bytes());
            write_frame(stream, &frame)?;
            Ok(())
        };
        let mut streams: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
        for (peer, addr) in peers.iter().enumerate().take(rank) {
            let mut stream = loop {
                match TcpStream::connect(addr) {
                    Ok(stream) => break stream,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    Err(err) => bail!("rank {peer} at {addr} did not answer: {err}"),
                }
            };
            stream.set_nodelay(true)?;
            hello(&mut stream)?;
            check_hello(&mut stream, Some(peer), size, identity, connect_timeout)?;
            streams[peer] = Some(stream);
        }
        listener.set_nonblocking(true)?;
        while streams[rank + 1..].iter().any(Option::is_none) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nonblocking(false)?;
                    stream.set_nodelay(true)?;
                    let peer = check_hello(&mut stream, None, size, identity, connect_timeout)?;
                    if peer <= rank || streams[peer].is_some() {
                        bail!("rank {peer} connected twice or out of turn");
                    }
                    hello(&mut stream)?;
                    streams[peer] = Some(stream);
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> =
                            (rank + 1..size).filter(|&p| streams[p].is_none()).collect();
                        bail!("ranks {missing:?} did not join within {connect_timeout:?}");
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(err) => return Err(err.into()),
            }
        }
        let mut writers = Vec::with_capacity(size);
        let mut readers = Vec::with_capacity(size);
        for stream in streams {
            let Some(stream) = stream else {
                writers.push(None);
                readers.push(None);
                continue;
            };
            stream.set_read_timeout(Some(stall_timeout))?;
            let mut writer = stream.try_clone()?;
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
            writers.push(Some(tx));
            readers.push(Some(stream));
        }
        Ok(Links { writers, readers })
    }
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
            bail!(GroupError(
                "not connected to every rank of the group".into()
            ));
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

/// What carries a group's exchanges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EpTransport {
    /// The TCP mesh, through host memory: any ranks, with a stall timeout.
    Tcp,
    /// NCCL between GPU ranks (the TCP mesh forms the group and hands out NCCL's id).
    Nccl,
}

/// How activations cross the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Wire {
    /// Exact: an expert-parallel group computes what one process would, up to the order of
    /// summation.
    F32,
    /// Half the bytes; rounds each activation to bf16 (what DeepEP sends).
    Bf16,
}

impl Wire {
    fn put(self, out: &mut Vec<u8>, values: &[f32]) {
        match self {
            Wire::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Wire::Bf16 => values.iter().for_each(|v| {
                out.extend_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes())
            }),
        }
    }

    fn get(self, bytes: &mut &[u8], n: usize) -> Result<Vec<f32>> {
        let width = match self {
            Wire::F32 => 4,
            Wire::Bf16 => 2,
        };
        let (data, rest) = bytes.split_at_checked(n * width).ok_or_else(truncated)?;
        *bytes = rest;
        Ok(match self {
            Wire::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Wire::Bf16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
        })
    }
}

/// A message shorter than it says: the group can no longer be trusted to agree.
fn truncated() -> GroupError {
    GroupError("a truncated expert-parallel message".into())
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn get_u32(bytes: &mut &[u8]) -> Result<u32> {
    let (head, rest) = bytes.split_at_checked(4).ok_or_else(truncated)?;
    *bytes = rest;
    Ok(u32::from_le_bytes([head[0], head[1], head[2], head[3]]))
}

/// One token sent to a rank: its row and the experts (with gate weights) it wants there.
struct Dispatched {
    experts: Vec<usize>,
    weights: Vec<f32>,
}

/// `[tokens u32] ([experts u32] ([expert u32] [weight f32])*)* [activations]`
fn encode_dispatch(
    wire: Wire,
    tokens: &[(usize, Dispatched)],
    rows: &[f32],
    hidden: usize,
) -> Vec<u8> {
    let mut out = Vec::new();
    put_u32(&mut out, tokens.len() as u32);
    for (_, d) in tokens {
        put_u32(&mut out, d.experts.len() as u32);
        for (&e, &w) in d.experts.iter().zip(&d.weights) {
            put_u32(&mut out, e as u32);
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
    for &(t, _) in tokens {
        wire.put(&mut out, &rows[t * hidden..][..hidden]);
    }
    out
}

fn decode_dispatch(wire: Wire, mut bytes: &[u8], hidden: usize) -> Result<(Vec<f32>, Routing)> {
    let bytes = &mut bytes;
    let tokens = get_u32(bytes)? as usize;
    let mut routing = Routing {
        experts: Vec::with_capacity(tokens),
        weights: Vec::with_capacity(tokens),
    };
    for _ in 0..tokens {
        let k = get_u32(bytes)? as usize;
        let (mut experts, mut weights) = (Vec::with_capacity(k), Vec::with_capacity(k));
        for _ in 0..k {
            experts.push(get_u32(bytes)? as usize);
            weights.push(f32::from_bits(get_u32(bytes)?));
        }
        routing.experts.push(experts);
        routing.weights.push(weights);
    }
    Ok((wire.get(bytes, tokens * hidden)?, routing))
}

/// The routed experts of one rank of an expert-parallel group.
pub struct ExpertParallel {
    /// This rank's experts: on the CPU, or a GPU's.
    local: Box<dyn RoutedExperts>,
    plan: PlacementPlan,
    transport: Arc<dyn Transport>,
    wire: Wire,
    hidden: usize,
    /// Bytes of dispatch and combine messages sent to other ranks.
    sent: AtomicU64,
}

impl ExpertParallel {
    pub fn new(
        local: Box<dyn RoutedExperts>,
        plan: PlacementPlan,
        transport: Arc<dyn Transport>,
        wire: Wire,
        hidden: usize,
    ) -> Self {
        ExpertParallel {
            local,
            plan,
            transport,
            wire,
            hidden,
            sent: AtomicU64::new(0),
        }
    }

    /// An all-to-all, counting the bytes that leave this rank.
    fn exchange(&self, outgoing: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let rank = self.transport.rank();
        let bytes: usize = outgoing
            .iter()
            .enumerate()
            .filter(|(d, _)| *d != rank)
            .map(|(_, m)| m.len())
            .sum();
        self.sent.fetch_add(bytes as u64, Ordering::Relaxed);
        self.transport.all_to_all(outgoing)
    }

    /// The rank that computes expert `expert` of `layer` for token `t`: this rank when it
    /// holds a copy, else one of the copies, spread by token.
    fn owner(&self, layer: usize, expert: usize, t: usize) -> usize {
        let copies = &self.plan.layer(layer as u32)[expert];
        let rank = self.transport.rank() as u32;
        if copies.contains(&rank) {
            return rank as usize;
        }
        copies[t % copies.len()] as usize
    }
}

impl RoutedExperts for ExpertParallel {
    fn bytes_sent(&self) -> Option<u64> {
        Some(self.sent.load(Ordering::Relaxed))
    }

    fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        routing: &Routing,
        _per_row: bool,
    ) -> Result<Tensor> {
        let (tokens, hidden) = x.dims2()?;
        if hidden != self.hidden {
            bail!("hidden size {hidden}, expected {}", self.hidden);
        }
        let rows = x.flatten_all()?.to_vec1::<f32>()?;
        let size = self.transport.size();
        // Per destination rank, in token order: (token, what it wants there).
        let mut sends: Vec<Vec<(usize, Dispatched)>> = (0..size).map(|_| Vec::new()).collect();
        for t in 0..tokens {
            let mut by_rank: BTreeMap<usize, Dispatched> = BTreeMap::new();
            for (&e, &w) in routing.experts[t].iter().zip(&routing.weights[t]) {
                let d = by_rank
                    .entry(self.owner(layer, e, t))
                    .or_insert(Dispatched {
                        experts: Vec::new(),
                        weights: Vec::new(),
                    });
                d.experts.push(e);
                d.weights.push(w);
            }
            for (rank, d) in by_rank {
                sends[rank].push((t, d));
            }
        }
        let outgoing = sends
            .iter()
            .map(|tokens| encode_dispatch(self.wire, tokens, &rows, hidden))
            .collect();
        let received = self.exchange(outgoing)?;
        // Every rank's tokens in one pass, so each local expert's weights are read once.
        let mut xs = Vec::new();
        let mut routing = Routing {
            experts: Vec::new(),
            weights: Vec::new(),
        };
        let mut counts = Vec::with_capacity(received.len());
        for bytes in &received {
            let (x, r) = decode_dispatch(self.wire, bytes, hidden)?;
            counts.push(r.experts.len());
            xs.extend(x);
            routing.experts.extend(r.experts);
            routing.weights.extend(r.weights);
        }
        let n = routing.experts.len();
        let ys = if n > 0 {
            let xs = Tensor::from_vec(xs, (n, hidden), &Device::Cpu)?;
            let ys = self.local.forward(layer, &xs, &routing, false)?;
            ys.flatten_all()?.to_vec1::<f32>()?
        } else {
            Vec::new()
        };
        let mut rows = ys.chunks_exact(hidden.max(1));
        let replies = counts
            .iter()
            .map(|&count| {
                let mut reply = Vec::new();
                for y in rows.by_ref().take(count) {
                    self.wire.put(&mut reply, y);
                }
                reply
            })
            .collect();
        let results = self.exchange(replies)?;
        let mut out = vec![0f32; tokens * hidden];
        // Ranks in order, so the sum is the same every time.
        for (sent, bytes) in sends.iter().zip(&results) {
            let ys = self.wire.get(&mut bytes.as_slice(), sent.len() * hidden)?;
            for (&(t, _), y) in sent.iter().zip(ys.chunks_exact(hidden)) {
                for (o, v) in out[t * hidden..][..hidden].iter_mut().zip(y) {
                    *o += v;
                }
            }
        }
        Ok(Tensor::from_vec(out, (tokens, hidden), &Device::Cpu)?)
    }
}

/// Loads one rank of an expert-parallel group from a checkpoint directory: the replicated
/// parts and the routed experts `plan` gives rank `rank`; no other expert is read from disk.
/// `join` is called once the weights are in memory (ranks load at their own pace and meet
/// only when ready) and returns the group's transport, which the model keeps.
pub fn open_rank(
    dir: &Path,
    plan: PlacementPlan,
    rank: usize,
    wire: Wire,
    join: impl FnOnce() -> Result<Arc<dyn Transport>>,
) -> Result<(Model, Arc<dyn Transport>)> {
    let mut joined = None;
    let model = Model::open_with_experts(dir, |cfg, ckpt| {
        plan_matches_model(&plan, cfg.moe.n_routed_experts)?;
        let local = LocalExperts::load_owned(cfg, ckpt, |layer, e| {
            plan.layer(layer as u32)[e].contains(&(rank as u32))
        })?;
        let transport = join()?;
        plan_matches_group(&plan, transport.as_ref(), rank)?;
        joined = Some(transport.clone());
        let hidden = cfg.hidden_size;
        Ok(Box::new(ExpertParallel::new(
            Box::new(local),
            plan,
            transport,
            wire,
            hidden,
        )))
    })?;
    Ok((model, joined.expect("the experts were loaded")))
}

/// The plan is for a model with `experts` routed experts.
pub fn plan_matches_model(plan: &PlacementPlan, experts: usize) -> Result<()> {
    if plan.routed_experts as usize != experts {
        bail!(
            "the placement plan has {} routed experts, the model {experts}",
            plan.routed_experts
        );
    }
    Ok(())
}

/// The plan is for this group, and the transport puts this process at rank `rank`.
pub fn plan_matches_group(
    plan: &PlacementPlan,
    transport: &dyn Transport,
    rank: usize,
) -> Result<()> {
    if plan.group_size as usize != transport.size() || transport.rank() != rank {
        bail!(
            "the placement plan is for {} ranks, the group has {} (this is rank {})",
            plan.group_size,
            transport.size(),
            transport.rank()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_messages_round_trip() {
        let rows: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let tokens = vec![(
            1,
            Dispatched {
                experts: vec![3, 7],
                weights: vec![0.25, 0.75],
            },
        )];
        for wire in [Wire::F32, Wire::Bf16] {
            let bytes = encode_dispatch(wire, &tokens, &rows, 3);
            let (xs, routing) = decode_dispatch(wire, &bytes, 3).unwrap();
            assert_eq!(xs, [1.5, 2.0, 2.5]);
            assert_eq!(routing.experts, [vec![3, 7]]);
            assert_eq!(routing.weights, [vec![0.25, 0.75]]);
            assert!(decode_dispatch(wire, &bytes[..bytes.len() - 1], 3).is_err());
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
            .map(|e| format!("{e:#}"))
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
