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
use std::path::Path;
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender, channel};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use deepseek_proto::placement::PlacementPlan;

use crate::model::Model;
use crate::model::moe::{LocalExperts, RoutedExperts, Routing};

/// All-to-all among the ranks of a group.
pub trait Transport: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Sends `outgoing[d]` to rank `d` (this rank included) and returns what every rank sent
    /// here, `incoming[s]` from rank `s`. Returns once every rank's message has arrived.
    fn all_to_all(&self, outgoing: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>>;
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
        for (to, message) in self.to.iter().zip(outgoing) {
            to.send(message).context("a rank of the group has gone")?;
        }
        let from = self.from.lock().unwrap_or_else(|p| p.into_inner());
        from.iter()
            .map(|r| r.recv().context("a rank of the group has gone"))
            .collect()
    }
}

/// How activations cross the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
        let (data, rest) = bytes
            .split_at_checked(n * width)
            .context("a truncated expert-parallel message")?;
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

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn get_u32(bytes: &mut &[u8]) -> Result<u32> {
    let (head, rest) = bytes
        .split_at_checked(4)
        .context("a truncated expert-parallel message")?;
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
    local: LocalExperts,
    plan: PlacementPlan,
    transport: Box<dyn Transport>,
    wire: Wire,
    hidden: usize,
}

impl ExpertParallel {
    pub fn new(
        local: LocalExperts,
        plan: PlacementPlan,
        transport: Box<dyn Transport>,
        wire: Wire,
        hidden: usize,
    ) -> Self {
        ExpertParallel {
            local,
            plan,
            transport,
            wire,
            hidden,
        }
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
        let received = self.transport.all_to_all(outgoing)?;
        let replies = received
            .iter()
            .map(|bytes| {
                let (xs, routing) = decode_dispatch(self.wire, bytes, hidden)?;
                let n = routing.experts.len();
                let mut reply = Vec::new();
                if n > 0 {
                    let xs = Tensor::from_vec(xs, (n, hidden), &Device::Cpu)?;
                    let ys = self.local.forward(layer, &xs, &routing, false)?;
                    self.wire
                        .put(&mut reply, &ys.flatten_all()?.to_vec1::<f32>()?);
                }
                Ok(reply)
            })
            .collect::<Result<Vec<_>>>()?;
        let results = self.transport.all_to_all(replies)?;
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
/// parts, and the routed experts `plan` gives rank `transport.rank()`; no other expert is
/// read from disk.
pub fn open_rank(
    dir: &Path,
    plan: PlacementPlan,
    transport: Box<dyn Transport>,
    wire: Wire,
) -> Result<Model> {
    Model::open_with_experts(dir, |cfg, ckpt| {
        if plan.routed_experts as usize != cfg.moe.n_routed_experts {
            bail!(
                "the placement plan has {} routed experts, the model {}",
                plan.routed_experts,
                cfg.moe.n_routed_experts
            );
        }
        if plan.group_size as usize != transport.size() {
            bail!(
                "the placement plan is for {} ranks, the group has {}",
                plan.group_size,
                transport.size()
            );
        }
        let rank = transport.rank() as u32;
        let local = LocalExperts::load_owned(cfg, ckpt, |layer, e| {
            plan.layer(layer as u32)[e].contains(&rank)
        })?;
        let hidden = cfg.hidden_size;
        Ok(Box::new(ExpertParallel::new(
            local, plan, transport, wire, hidden,
        )))
    })
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
