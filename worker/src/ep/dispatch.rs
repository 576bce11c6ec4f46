//! One rank's routed experts in a group: dispatch each token to the ranks that own its
//! experts, compute what arrived, combine the results back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{Device, Tensor};
use deepseek_proto::placement::PlacementPlan;

use super::Transport;
use super::wire::{Dispatched, Wire, decode_dispatch, encode_dispatch};
use crate::bail;
use crate::error::Result;
use crate::model::moe::{RoutedExperts, Routing};

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

    /// Per destination rank, in token order: each token sent there and what it wants there
    /// (one copy per rank, however many of its experts the rank computes).
    fn destinations(&self, layer: usize, routing: &Routing) -> Vec<Vec<(usize, Dispatched)>> {
        let mut sends: Vec<Vec<(usize, Dispatched)>> =
            (0..self.transport.size()).map(|_| Vec::new()).collect();
        for (t, (experts, weights)) in routing.experts.iter().zip(&routing.weights).enumerate() {
            let mut by_rank: BTreeMap<usize, Dispatched> = BTreeMap::new();
            for (&e, &w) in experts.iter().zip(weights) {
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
        sends
    }

    /// Runs every rank's dispatched tokens through this rank's experts in one pass (each
    /// expert's weights read once) and returns each rank's reply, in its tokens' order.
    fn compute_received(&self, layer: usize, received: &[Vec<u8>]) -> Result<Vec<Vec<u8>>> {
        let hidden = self.hidden;
        let mut xs = Vec::new();
        let mut routing = Routing {
            experts: Vec::new(),
            weights: Vec::new(),
        };
        let mut counts = Vec::with_capacity(received.len());
        for bytes in received {
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
        Ok(counts
            .iter()
            .map(|&count| {
                let mut reply = Vec::new();
                for y in rows.by_ref().take(count) {
                    self.wire.put(&mut reply, y);
                }
                reply
            })
            .collect())
    }
}

impl RoutedExperts for ExpertParallel {
    /// Every rank holds its experts as the checkpoint stores them, as this one does.
    fn rows_independent(&self) -> bool {
        self.local.rows_independent()
    }

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
        let sends = self.destinations(layer, routing);
        let outgoing = sends
            .iter()
            .map(|tokens| encode_dispatch(self.wire, tokens, &rows, hidden))
            .collect();
        let received = self.exchange(outgoing)?;
        let replies = self.compute_received(layer, &received)?;
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
