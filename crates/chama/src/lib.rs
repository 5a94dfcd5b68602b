//! Chama: a trace-driven operating-system-noise simulator over the LogGOPS model.
//!
//! Inputs are GOAL schedules ([`goal`]), traces recorded by our runtime ([`trace`]) and built-in
//! generators ([`gen`]); [`noise`] describes detours and latency fluctuations; [`sim`] runs the
//! LogGOPS discrete-event simulation; [`analysis`] compares a noisy run with the noise-free one.
#![forbid(unsafe_code)]

pub mod analysis;
pub mod error;
pub mod gen;
pub mod goal;
pub mod mapped;
pub mod noise;
pub mod ops;
pub mod schedule;
pub mod sim;
pub mod states;
pub mod stream;
pub mod svg;
pub mod trace;
