//! Ending a measurement early. The sampling loops look at one process-wide flag about once per
//! interval or sample; when it is set (by the command line's SIGINT/SIGTERM handler, or by
//! [`request`]) they stop, and the run keeps what was sampled up to then instead of losing it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

static STOP: LazyLock<Arc<AtomicBool>> = LazyLock::new(|| Arc::new(AtomicBool::new(false)));

/// The flag itself, for a signal handler to set (`signal_hook::flag::register`) or a sampling
/// loop to look at without going through [`requested`] on every turn.
pub fn flag() -> Arc<AtomicBool> {
    STOP.clone()
}

/// Asks every running measurement of this process to end at its next look.
pub fn request() {
    STOP.store(true, Ordering::Relaxed);
}

/// Whether an early end was asked for.
pub fn requested() -> bool {
    STOP.load(Ordering::Relaxed)
}
