//! A one-line progress display on stderr, shown only when stderr is a terminal.

use crate::sys::now_ns;
use std::io::{IsTerminal, Write};

/// Progress of a timed run from `t0` to `t_end` (absolute monotonic nanoseconds).
pub struct Progress {
    enabled: bool,
    label: &'static str,
    t0: u64,
    t_end: u64,
    last_draw: u64,
}

impl Progress {
    /// A progress line for `label`; inactive unless `want` and stderr is a terminal.
    pub fn new(want: bool, label: &'static str, t0: u64, t_end: u64) -> Self {
        Progress {
            enabled: want && std::io::stderr().is_terminal(),
            label,
            t0,
            t_end,
            last_draw: 0,
        }
    }

    /// Whether anything is drawn (when not, nobody needs to poll for updates).
    pub fn active(&self) -> bool {
        self.enabled
    }

    /// Redraw (at most four times a second) given the time sampled up to so far.
    pub fn update(&mut self, sampled_to: u64) {
        if !self.enabled {
            return;
        }
        let now = now_ns();
        if now < self.last_draw + 250_000_000 {
            return;
        }
        self.last_draw = now;
        let total = (self.t_end - self.t0) as f64 / 1e9;
        let done = (sampled_to.saturating_sub(self.t0) as f64 / 1e9).min(total);
        let frac = if total > 0.0 { done / total } else { 1.0 };
        let width = 30;
        let filled = (frac * width as f64) as usize;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{} [{}{}] {:5.1}/{:.1} s ",
            self.label,
            "#".repeat(filled),
            " ".repeat(width - filled.min(width)),
            done,
            total
        );
        let _ = err.flush();
    }

    /// Clear the line.
    pub fn finish(&mut self) {
        if self.enabled {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{}\r", " ".repeat(60));
            let _ = err.flush();
        }
    }
}
