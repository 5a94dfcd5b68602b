//! Operating-system noise measurement in the manner of the right-weight paper (seed 003):
//! a fixed-time-quantum (FTQ) sampler on an absolute, aligned time base, fixed-work (FWQ),
//! selfish-detour and the defective "Figure 1" benchmark for comparison, and the analysis the
//! clean FTQ time base allows: lost-work noise fraction, Hamming-windowed Welch spectrum,
//! cepstrum, interference frequencies with their lost work, detour histograms, SVG plots and an
//! HTML report.
#![forbid(unsafe_code)]

pub mod analysis;
pub mod error;
pub mod format;
pub mod ftq;
pub mod inject;
pub mod interrupt;
pub mod modes;
pub mod progress;
pub mod report;
pub mod stats;
pub mod svg;
pub mod sys;
pub mod units;
pub mod work;

pub use error::{NoiseError, Result};
pub use ftq::{FtqConfig, FtqRun};
