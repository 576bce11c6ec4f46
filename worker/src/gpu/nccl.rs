//! NCCL between the GPU ranks of an expert-parallel group (`--ep-transport nccl`): the same
//! all-to-all of byte messages as the TCP mesh, moved GPU to GPU by NCCL (NVLink within a
//! node, InfiniBand or RoCE between nodes). The TCP mesh still forms the group — its hello
//! checks every rank runs the same model and plan — and carries NCCL's unique id from rank 0.
//!
//! Unlike the TCP mesh, NCCL has no stall timeout: a rank that dies mid-exchange leaves its
//! peers waiting inside NCCL. TCP stays the default.

use std::sync::{Arc, Mutex};

use cudarc::driver::CudaStream;
use cudarc::nccl::result::{group_end, group_start};
use cudarc::nccl::{Comm, Id};

use crate::ensure;
use crate::ep::{GroupError, TcpTransport, Transport};
use crate::error::{Context, Error, Result};

/// An NCCL communicator; NCCL allows any thread to use one, one call at a time (the Mutex
/// around it sees to that).
struct Communicator(Comm);

// SAFETY: see above; the communicator is only reached through `NcclTransport::comm`.
unsafe impl Send for Communicator {}

pub struct NcclTransport {
    tcp: TcpTransport,
    stream: Arc<CudaStream>,
    comm: Mutex<Communicator>,
}

impl NcclTransport {
    /// Forms the NCCL communicator of `tcp`'s group, on `stream`'s GPU.
    pub fn connect(tcp: TcpTransport, stream: Arc<CudaStream>) -> Result<Self> {
        // SAFETY: only probes for the library with dlopen (cudarc panics on first use without).
        ensure!(
            unsafe { cudarc::nccl::sys::is_culib_present() },
            "--ep-transport nccl: no libnccl on the library path (install NCCL 2, e.g. `pip \
             install nvidia-nccl-cu12`, and add its lib directory to LD_LIBRARY_PATH)"
        );
        let comm = communicator(&tcp, &stream)?;
        Ok(NcclTransport {
            tcp,
            stream,
            comm: Mutex::new(comm),
        })
    }
}

/// Rank 0 draws NCCL's unique id and sends it to every rank over TCP; all then join.
fn communicator(tcp: &TcpTransport, stream: &Arc<CudaStream>) -> Result<Communicator> {
    let (rank, size) = (tcp.rank(), tcp.size());
    let id = if rank == 0 {
        let id = Id::new().map_err(|e| Error::Message(format!("ncclGetUniqueId: {e:?}")))?;
        id.internal().iter().map(|&c| c as u8).collect()
    } else {
        Vec::new()
    };
    let outgoing = (0..size).map(|_| id.clone()).collect();
    let from_zero = tcp.all_to_all(outgoing)?.swap_remove(0);
    if from_zero.len() != 128 {
        return Err(GroupError("rank 0 sent no NCCL id".into()).into());
    }
    let mut internal = [0 as std::ffi::c_char; 128];
    for (slot, byte) in internal.iter_mut().zip(&from_zero) {
        *slot = *byte as std::ffi::c_char;
    }
    let comm = Comm::from_rank(stream.clone(), rank, size, Id::uninit(internal))
        .map_err(|e| Error::Message(format!("ncclCommInitRank (rank {rank} of {size}): {e:?}")))?;
    Ok(Communicator(comm))
}

/// A failed NCCL call: the group can no longer exchange.
fn failed(what: &str) -> impl Fn(cudarc::nccl::result::NcclError) -> Error + '_ {
    move |e| GroupError(format!("NCCL {what}: {e:?}")).into()
}

impl Transport for NcclTransport {
    fn rank(&self) -> usize {
        self.tcp.rank()
    }

    fn size(&self) -> usize {
        self.tcp.size()
    }

    fn all_to_all(&self, outgoing: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let size = self.size();
        ensure!(
            outgoing.len() == size,
            "all_to_all needs one message per rank"
        );
        let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        let comm = &comm.0;
        let stream = &self.stream;

        // First every pair's message length, then the messages, each as one grouped call.
        let lengths: Vec<u64> = outgoing.iter().map(|m| m.len() as u64).collect();
        let lengths_out = stream.clone_htod(&lengths)?;
        let mut lengths_in = stream.alloc_zeros::<u64>(size)?;
        group_start().map_err(failed("group start"))?;
        for peer in 0..size {
            comm.send(&lengths_out.slice(peer..peer + 1), peer as i32)
                .map_err(failed("send"))?;
            comm.recv(&mut lengths_in.slice_mut(peer..peer + 1), peer as i32)
                .map_err(failed("receive"))?;
        }
        group_end().map_err(failed("group end"))?;
        let lengths_in: Vec<usize> = stream
            .clone_dtoh(&lengths_in)?
            .into_iter()
            .map(|l| l as usize)
            .collect();

        let received_total: usize = lengths_in.iter().sum();
        // never a zero-byte allocation
        let mut flat = outgoing.concat();
        if flat.is_empty() {
            flat.push(0);
        }
        let send = stream.clone_htod(&flat)?;
        let mut receive = stream.alloc_zeros::<u8>(received_total.max(1))?;
        group_start().map_err(failed("group start"))?;
        let (mut from, mut into) = (0, 0);
        for peer in 0..size {
            let (out, inn) = (outgoing[peer].len(), lengths_in[peer]);
            if out > 0 {
                comm.send(&send.slice(from..from + out), peer as i32)
                    .map_err(failed("send"))?;
            }
            if inn > 0 {
                comm.recv(&mut receive.slice_mut(into..into + inn), peer as i32)
                    .map_err(failed("receive"))?;
            }
            (from, into) = (from + out, into + inn);
        }
        group_end().map_err(failed("group end"))?;
        let received = stream.clone_dtoh(&receive)?;
        let mut start = 0;
        Ok(lengths_in
            .iter()
            .map(|&len| {
                let message = received[start..start + len].to_vec();
                start += len;
                message
            })
            .collect())
    }

    fn rejoin(&self) -> Result<()> {
        self.tcp.rejoin()?;
        let comm = communicator(&self.tcp, &self.stream).context("re-forming the NCCL group")?;
        *self.comm.lock().unwrap_or_else(|p| p.into_inner()) = comm;
        Ok(())
    }
}
