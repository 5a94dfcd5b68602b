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
pub mod noise;
pub mod schedule;
pub mod sim;
pub mod stream;
pub mod svg;
pub mod trace;

/// TEMPORARY phase timer (CHAMA_PHASES=1): wall since the first call and process CPU.
#[doc(hidden)]
pub fn phase(name: &str) {
    use std::sync::OnceLock;
    static T0: OnceLock<std::time::Instant> = OnceLock::new();
    static ON: OnceLock<bool> = OnceLock::new();
    let t0 = *T0.get_or_init(std::time::Instant::now);
    if !*ON.get_or_init(|| std::env::var_os("CHAMA_PHASES").is_some()) {
        return;
    }
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s[s.rfind(')')? + 2..].to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((
                f.get(11)?.parse::<f64>().ok()?,
                f.get(12)?.parse::<f64>().ok()?,
                f.get(7)?.parse::<u64>().ok()?,
            ))
        })
        .unwrap_or((0.0, 0.0, 0));
    eprintln!(
        "phase {name:<14} wall {:7.3}  user {:6.2} sys {:5.2} minflt {}",
        t0.elapsed().as_secs_f64(),
        cpu.0 / 100.0,
        cpu.1 / 100.0,
        cpu.2
    );
}
