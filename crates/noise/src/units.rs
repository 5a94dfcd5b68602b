//! Parsing of the human units the command line takes: `10s`, `1ms`, `200us`, `100Hz`, `0,2-3`.

use crate::error::{NoiseError, Result};

/// Parse a duration such as `10s`, `1.5s`, `250ms`, `200us`, `500ns` into nanoseconds.
/// A bare number is taken as seconds.
pub fn parse_duration_ns(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| c.is_ascii_alphabetic() || c == 'µ')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.trim().parse().map_err(|_| {
        NoiseError::bad(
            "duration",
            text,
            "expected a number with a unit, e.g. 10s, 1ms, 200us",
        )
    })?;
    let scale = match unit.trim() {
        "" | "s" | "sec" => 1e9,
        "ms" => 1e6,
        "us" | "µs" => 1e3,
        "ns" => 1.0,
        "m" | "min" => 60e9,
        other => {
            return Err(NoiseError::bad(
                "duration",
                text,
                format!("unknown unit `{other}` (use s, ms, us or ns)"),
            ))
        }
    };
    let ns = value * scale;
    if !ns.is_finite() || !(0.0..=1e18).contains(&ns) {
        return Err(NoiseError::bad("duration", text, "out of range"));
    }
    Ok(ns.round() as u64)
}

/// Parse a frequency such as `100Hz`, `1kHz`, `2.5hz` into hertz.
pub fn parse_frequency_hz(text: &str) -> Result<f64> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let (num, scale) = if let Some(n) = lower.strip_suffix("khz") {
        (n, 1e3)
    } else if let Some(n) = lower.strip_suffix("hz") {
        (n, 1.0)
    } else {
        (lower.as_str(), 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| NoiseError::bad("frequency", text, "expected e.g. 100Hz or 1kHz"))?;
    let hz = v * scale;
    if !hz.is_finite() || hz <= 0.0 {
        return Err(NoiseError::bad("frequency", text, "must be positive"));
    }
    Ok(hz)
}

/// Parse a CPU list such as `1`, `0,1`, `0-3,6`.
pub fn parse_cpu_list(text: &str) -> Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let parse_one = |s: &str| -> Result<usize> {
            s.trim()
                .parse()
                .map_err(|_| NoiseError::bad("cpu list", text, "expected numbers like 0,1 or 0-3"))
        };
        if let Some((a, b)) = part.split_once('-') {
            let (a, b) = (parse_one(a)?, parse_one(b)?);
            if a > b {
                return Err(NoiseError::bad("cpu list", text, "range runs backwards"));
            }
            cpus.extend(a..=b);
        } else {
            cpus.push(parse_one(part)?);
        }
    }
    if cpus.is_empty() {
        return Err(NoiseError::bad("cpu list", text, "no CPU given"));
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Format a CPU list the way [`parse_cpu_list`] reads it (`0,1,3`).
pub fn format_cpu_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A periodic interference to inject: `100Hz:200us` wakes 100 times a second and burns 200 µs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InjectSpec {
    /// Wake-ups per second.
    pub frequency_hz: f64,
    /// CPU time burnt per wake-up, nanoseconds.
    pub burn_ns: u64,
}

impl InjectSpec {
    /// The fraction of the CPU this interference takes (burn × frequency).
    pub fn duty_cycle(&self) -> f64 {
        self.burn_ns as f64 * 1e-9 * self.frequency_hz
    }
    /// Period between wake-ups in nanoseconds.
    pub fn period_ns(&self) -> u64 {
        (1e9 / self.frequency_hz).round() as u64
    }
}

impl std::str::FromStr for InjectSpec {
    type Err = NoiseError;
    fn from_str(s: &str) -> Result<Self> {
        let (f, b) = s.split_once(':').ok_or_else(|| {
            NoiseError::bad("injection", s, "expected FREQ:BURN, e.g. 100Hz:200us")
        })?;
        let spec = InjectSpec {
            frequency_hz: parse_frequency_hz(f)?,
            burn_ns: parse_duration_ns(b)?,
        };
        if spec.burn_ns == 0 || spec.duty_cycle() >= 1.0 {
            return Err(NoiseError::bad(
                "injection",
                s,
                "burn must be positive and shorter than the period",
            ));
        }
        Ok(spec)
    }
}

impl std::fmt::Display for InjectSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}Hz:{}us", self.frequency_hz, self.burn_ns as f64 / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ns("10s").unwrap(), 10_000_000_000);
        assert_eq!(parse_duration_ns("1ms").unwrap(), 1_000_000);
        assert_eq!(parse_duration_ns("200us").unwrap(), 200_000);
        assert_eq!(parse_duration_ns("1.5").unwrap(), 1_500_000_000);
        assert!(parse_duration_ns("10 parsecs").is_err());
        assert!(parse_duration_ns("-1s").is_err());
        assert!(parse_duration_ns("").is_err());
    }

    #[test]
    fn frequencies_cpus_injection() {
        assert_eq!(parse_frequency_hz("1kHz").unwrap(), 1000.0);
        assert!(parse_frequency_hz("0Hz").is_err());
        assert_eq!(parse_cpu_list("0-2,5,1").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("x").is_err());
        let i: InjectSpec = "100Hz:200us".parse().unwrap();
        assert_eq!(i.period_ns(), 10_000_000);
        assert!((i.duty_cycle() - 0.02).abs() < 1e-12);
        assert!("100Hz:20ms".parse::<InjectSpec>().is_err());
        assert!("100Hz".parse::<InjectSpec>().is_err());
    }
}
