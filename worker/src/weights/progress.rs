//! The one-line progress report on a terminal while a large checkpoint loads.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::Checkpoint;

/// A one-line progress report on a terminal while a large checkpoint loads.
pub(super) struct Progress {
    total: usize,
    loaded: AtomicUsize,
    shown_percent: AtomicUsize,
}

/// Below this a load is quick enough to need no progress line.
const PROGRESS_MIN_BYTES: usize = 256 << 20;

impl Checkpoint {
    /// Shows progress on stderr while `total` bytes load, when stderr is a terminal and the
    /// load is large; quiet otherwise.
    pub fn with_progress(mut self, total: usize) -> Self {
        if total >= PROGRESS_MIN_BYTES && std::io::stderr().is_terminal() {
            self.progress = Some(Progress {
                total,
                loaded: AtomicUsize::new(0),
                shown_percent: AtomicUsize::new(0),
            });
        }
        self
    }

    pub(super) fn advance(&self, bytes: usize) {
        let Some(p) = &self.progress else { return };
        let loaded = p.loaded.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let percent = (loaded * 100 / p.total).min(100);
        if p.shown_percent.swap(percent, Ordering::Relaxed) != percent {
            let gb = |b: usize| b as f64 / 1e9;
            eprint!(
                "\rloading weights {percent:3}% ({:.1}/{:.1} GB)",
                gb(loaded),
                gb(p.total)
            );
            if percent == 100 {
                eprintln!();
            }
        }
    }
}
