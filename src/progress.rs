//! Progress lines for long work (frames imported, epochs): one line on stderr, rewritten in place
//! at most a few times a second, with counts and throughput.

use std::io::Write;
use std::time::{Duration, Instant};

/// A progress line.
pub struct Progress {
    label: String,
    total: Option<usize>,
    unit: &'static str,
    enabled: bool,
    start: Instant,
    last: Instant,
    done: usize,
    bytes: u64,
}

impl Progress {
    /// Starts a progress line; `total` when known.
    pub fn new(label: &str, total: Option<usize>, unit: &'static str, enabled: bool) -> Self {
        let now = Instant::now();
        Self {
            label: label.to_string(),
            total,
            unit,
            enabled,
            start: now,
            last: now,
            done: 0,
            bytes: 0,
        }
    }

    /// Records `done` items and `bytes` processed so far; redraws if due.
    pub fn set(&mut self, done: usize, bytes: u64) {
        self.done = done;
        self.bytes = bytes;
        if self.enabled && self.last.elapsed() >= Duration::from_millis(250) {
            self.last = Instant::now();
            self.draw(false);
        }
    }

    /// Draws the final line.
    pub fn finish(&mut self) {
        if self.enabled {
            self.draw(true);
        }
    }

    fn draw(&self, last: bool) {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let of = self.total.map(|t| format!("/{t}")).unwrap_or_default();
        let mb = self.bytes as f64 / 1e6;
        let line = format!(
            "{}: {}{of} {} ({:.0} {}/s, {:.1} MB/s)",
            self.label,
            self.done,
            self.unit,
            self.done as f64 / secs,
            self.unit,
            mb / secs
        );
        let mut e = std::io::stderr().lock();
        let _ = write!(e, "\r{line}\x1b[K{}", if last { "\n" } else { "" });
        let _ = e.flush();
    }
}
