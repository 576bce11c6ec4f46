//! What a download reports while it runs: counters shared by the file tasks, and their
//! snapshot as a terminal line or a JSON line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

#[derive(Debug)]
pub struct Progress {
    started: Instant,
    files_total: AtomicU64,
    files_done: AtomicU64,
    bytes_total: AtomicU64,
    bytes_done: AtomicU64,
    /// Of `bytes_done`, those that came over the network this run.
    bytes_fetched: AtomicU64,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            started: Instant::now(),
            files_total: AtomicU64::new(0),
            files_done: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            bytes_done: AtomicU64::new(0),
            bytes_fetched: AtomicU64::new(0),
        }
    }
}

/// One report.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct ProgressLine {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub files_done: u64,
    pub files_total: u64,
    /// Network bytes per second since the start.
    pub bytes_per_second: u64,
}

impl Progress {
    pub(super) fn start(&self, files: usize, bytes: u64) {
        self.files_total.store(files as u64, Ordering::Relaxed);
        self.bytes_total.store(bytes, Ordering::Relaxed);
    }

    /// Bytes found on disk already.
    pub(super) fn already(&self, bytes: u64) {
        self.bytes_done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes written as they came.
    pub(super) fn fetched(&self, bytes: u64) {
        self.bytes_done.fetch_add(bytes, Ordering::Relaxed);
        self.bytes_fetched.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes counted before and thrown away.
    pub(super) fn discard(&self, bytes: u64) {
        let _ = self
            .bytes_done
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |done| {
                Some(done.saturating_sub(bytes))
            });
    }

    pub(super) fn file_done(&self) {
        self.files_done.fetch_add(1, Ordering::Relaxed);
    }

    pub fn line(&self) -> ProgressLine {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-3);
        ProgressLine {
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            files_done: self.files_done.load(Ordering::Relaxed),
            files_total: self.files_total.load(Ordering::Relaxed),
            bytes_per_second: (self.bytes_fetched.load(Ordering::Relaxed) as f64 / seconds) as u64,
        }
    }
}

impl ProgressLine {
    /// For a terminal: `  12.3 / 690.0 GB   45%   3/163 files   1.2 GB/s`.
    pub fn terminal(&self) -> String {
        let gb = |bytes: u64| bytes as f64 / 1e9;
        let percent = self.bytes_done * 100 / self.bytes_total.max(1);
        format!(
            "{:>8.2} / {:.2} GB  {percent:>3}%  {}/{} files  {:.2} GB/s",
            gb(self.bytes_done),
            gb(self.bytes_total),
            self.files_done,
            self.files_total,
            gb(self.bytes_per_second)
        )
    }

    pub fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_make_lines_for_people_and_for_programs() {
        let progress = Progress::default();
        progress.start(3, 2_000_000_000);
        progress.already(500_000_000);
        progress.fetched(600_000_000);
        progress.discard(100_000_000);
        progress.file_done();
        let line = progress.line();
        assert_eq!(
            (
                line.bytes_done,
                line.bytes_total,
                line.files_done,
                line.files_total
            ),
            (1_000_000_000, 2_000_000_000, 1, 3)
        );
        assert!(line.bytes_per_second > 0);
        let text = line.terminal();
        assert!(text.contains("1.00 / 2.00 GB   50%  1/3 files"), "{text}");
        let parsed: ProgressLine = serde_json::from_str(&line.json()).unwrap();
        assert_eq!(parsed, line);
    }
}
