//! Lockstep with an expert-parallel group: every rank runs as many passes as the busiest
//! one, and a failed peer ends every open request while the group re-forms.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tonic::Status;

use super::sequence::Sequence;
use super::{Engine, Outcome};
use crate::error::{Error, Result};

/// How long a rank waits between attempts to re-form its failed group.
const GROUP_REJOIN_PAUSE: Duration = Duration::from_millis(500);

impl Engine {
    /// The passes (forward calls) this step runs: this rank's own, or in an expert-parallel
    /// group the most any rank needs, since every rank takes part in every pass's exchanges.
    pub(super) fn agree_on_passes(&self, mine: usize) -> Result<usize> {
        let Some(group) = &self.group else {
            return Ok(mine);
        };
        let counts = group.all_to_all(vec![(mine as u32).to_le_bytes().to_vec(); group.size()])?;
        counts.iter().try_fold(mine, |most, count| {
            let count: [u8; 4] = count
                .as_slice()
                .try_into()
                .map_err(|_| Error::msg("a malformed pass count from a peer"))?;
            Ok(most.max(u32::from_le_bytes(count) as usize))
        })
    }

    /// A peer of the group failed: every open request ends UNAVAILABLE, and the rank
    /// re-forms the group with its peers (health is NOT_SERVING meanwhile), retrying until
    /// the missing rank is back.
    pub(super) fn group_failed(&mut self, err: &Error) {
        tracing::error!(error = %err, "the expert-parallel group failed");
        self.load.group_down.store(true, Ordering::Relaxed);
        self.load.group_busy.store(false, Ordering::Relaxed);
        self.fail_open_requests();
        let Some(group) = self.group.clone() else {
            return;
        };
        while let Err(err) = group.rejoin() {
            tracing::warn!(error = %err, "re-forming the expert-parallel group");
            self.fail_open_requests();
            std::thread::sleep(GROUP_REJOIN_PAUSE);
        }
        tracing::info!("the expert-parallel group is back");
        self.fail_open_requests();
        self.load.group_down.store(false, Ordering::Relaxed);
    }

    fn fail_open_requests(&mut self) {
        while let Ok(submission) = self.inbox.try_recv() {
            self.waiting.push_back(Sequence::new(submission));
        }
        let unavailable = || {
            Status::unavailable("an expert-parallel peer of this worker failed; retry elsewhere")
        };
        for s in self.waiting.drain(..) {
            let _ = s.respond.send(Err(unavailable()));
        }
        while !self.running.is_empty() {
            self.finish(0, Outcome::Failed(unavailable()));
        }
        self.publish_load();
    }
}
