//! Hand-written SVG line and bar charts (no dependencies): enough for time series, spectra,
//! cepstra and histograms, with linear or logarithmic axes.

use std::fmt::Write as _;

/// One axis.
#[derive(Debug, Clone)]
pub struct Axis {
    /// Label under or beside the axis.
    pub label: String,
    /// Logarithmic scale (values ≤ 0 are left out).
    pub log: bool,
    /// Range; `None` = from the data.
    pub range: Option<(f64, f64)>,
}

impl Axis {
    /// A linear axis with an automatic range.
    pub fn linear(label: &str) -> Self {
        Axis {
            label: label.into(),
            log: false,
            range: None,
        }
    }
    /// A logarithmic axis with an automatic range.
    pub fn log(label: &str) -> Self {
        Axis {
            label: label.into(),
            log: true,
            range: None,
        }
    }
}

/// A polyline series.
#[derive(Debug, Clone)]
pub struct Line {
    /// Legend text.
    pub label: String,
    /// Points `(x, y)`.
    pub points: Vec<(f64, f64)>,
}

/// A chart.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Title at the top.
    pub title: String,
    /// Horizontal axis.
    pub x: Axis,
    /// Vertical axis.
    pub y: Axis,
    /// Line series.
    pub lines: Vec<Line>,
    /// Bars `(x0, x1, height)`.
    pub bars: Vec<(f64, f64, f64)>,
    /// Vertical markers `(x, text)`.
    pub markers: Vec<(f64, String)>,
}

const W: f64 = 860.0;
const H: f64 = 320.0;
const L: f64 = 70.0;
const R: f64 = 20.0;
const T: f64 = 30.0;
const B: f64 = 45.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

struct Scale {
    log: bool,
    lo: f64,
    hi: f64,
    a: f64,
    b: f64,
}

impl Scale {
    fn new(axis: &Axis, values: impl Iterator<Item = f64>, a: f64, b: f64) -> Scale {
        let vals: Vec<f64> = values
            .filter(|v| v.is_finite() && (!axis.log || *v > 0.0))
            .collect();
        let (mut lo, mut hi) = axis.range.unwrap_or_else(|| {
            let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            (lo, hi)
        });
        if !lo.is_finite() || !hi.is_finite() {
            (lo, hi) = if axis.log { (1.0, 10.0) } else { (0.0, 1.0) };
        }
        if axis.log {
            lo = 10f64.powf(lo.log10().floor());
            hi = 10f64.powf(hi.log10().ceil());
            if hi <= lo {
                hi = lo * 10.0;
            }
        } else if hi <= lo {
            hi = lo + 1.0;
            lo -= 1.0;
        }
        Scale {
            log: axis.log,
            lo,
            hi,
            a,
            b,
        }
    }
    fn map(&self, v: f64) -> Option<f64> {
        let t = if self.log {
            if v <= 0.0 {
                return None;
            }
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        };
        Some(self.a + t.clamp(-0.02, 1.02) * (self.b - self.a))
    }
    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let (a, b) = (
                self.lo.log10().round() as i32,
                self.hi.log10().round() as i32,
            );
            let step = ((b - a) / 8).max(1);
            (a..=b)
                .step_by(step as usize)
                .map(|e| 10f64.powi(e))
                .collect()
        } else {
            let span = self.hi - self.lo;
            let raw = span / 6.0;
            let mag = 10f64.powf(raw.log10().floor());
            let step = [1.0, 2.0, 5.0, 10.0]
                .iter()
                .map(|m| m * mag)
                .find(|s| span / s <= 8.0)
                .unwrap_or(10.0 * mag);
            let mut t = (self.lo / step).ceil() * step;
            let mut v = Vec::new();
            while t <= self.hi + step * 1e-9 {
                v.push(if t.abs() < step * 1e-6 { 0.0 } else { t });
                t += step;
            }
            v
        }
    }
}

fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.0e}")
    } else if a >= 100.0 || (v.fract() == 0.0) {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

impl Chart {
    /// A chart with no data yet.
    pub fn new(title: &str, x: Axis, y: Axis) -> Self {
        Chart {
            title: title.into(),
            x,
            y,
            lines: Vec::new(),
            bars: Vec::new(),
            markers: Vec::new(),
        }
    }

    /// Render as a standalone SVG document.
    pub fn render(&self) -> String {
        let xs = self
            .lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.0))
            .chain(self.bars.iter().flat_map(|b| [b.0, b.1]));
        let ys = self
            .lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.1))
            .chain(self.bars.iter().map(|b| b.2))
            .chain(if self.bars.is_empty() || self.y.log {
                None
            } else {
                Some(0.0)
            });
        let sx = Scale::new(&self.x, xs, L, W - R);
        let sy = Scale::new(&self.y, ys, H - B, T);
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">"#
        );
        let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="18" text-anchor="middle" font-size="13">{}</text>"#,
            W / 2.0,
            esc(&self.title)
        );
        // Grid and ticks.
        for t in sx.ticks() {
            if let Some(x) = sx.map(t) {
                let _ = writeln!(
                    s,
                    r##"<line x1="{x:.1}" y1="{T}" x2="{x:.1}" y2="{}" stroke="#eee"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
                    H - B,
                    H - B + 14.0,
                    fmt_tick(t)
                );
            }
        }
        for t in sy.ticks() {
            if let Some(y) = sy.map(t) {
                let _ = writeln!(
                    s,
                    r##"<line x1="{L}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                    W - R,
                    L - 4.0,
                    y + 4.0,
                    fmt_tick(t)
                );
            }
        }
        let _ = writeln!(
            s,
            r##"<rect x="{L}" y="{T}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
            W - L - R,
            H - T - B
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (L + W - R) / 2.0,
            H - 8.0,
            esc(&self.x.label)
        );
        let _ = writeln!(
            s,
            r#"<text x="14" y="{}" text-anchor="middle" transform="rotate(-90 14 {})">{}</text>"#,
            (T + H - B) / 2.0,
            (T + H - B) / 2.0,
            esc(&self.y.label)
        );
        for &(x0, x1, h) in &self.bars {
            let base = if sy.log { sy.lo } else { 0.0 };
            if let (Some(a), Some(b), Some(top), Some(bot)) =
                (sx.map(x0), sx.map(x1), sy.map(h), sy.map(base))
            {
                let _ = writeln!(
                    s,
                    r##"<rect x="{a:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="#1f77b4" fill-opacity="0.7" stroke="#114"/>"##,
                    (b - a).max(1.0),
                    (bot - top).max(0.0)
                );
            }
        }
        for (i, line) in self.lines.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let mut pts = String::new();
            for &(x, y) in &line.points {
                if let (Some(px), Some(py)) = (sx.map(x), sy.map(y)) {
                    let _ = write!(pts, "{px:.1},{py:.1} ");
                }
            }
            let _ = writeln!(
                s,
                r#"<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1"/>"#
            );
            if self.lines.len() > 1 || !line.label.is_empty() {
                let ly = T + 14.0 + 14.0 * i as f64;
                let _ = writeln!(
                    s,
                    r#"<rect x="{}" y="{}" width="140" height="14" fill="white" fill-opacity="0.85"/>"#,
                    W - R - 155.0,
                    ly - 11.0
                );
                let _ = writeln!(
                    s,
                    r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
                    W - R - 150.0,
                    ly - 4.0,
                    W - R - 130.0,
                    ly - 4.0,
                    W - R - 125.0,
                    ly,
                    esc(&line.label)
                );
            }
        }
        for (x, text) in &self.markers {
            if let Some(px) = sx.map(*x) {
                let _ = writeln!(
                    s,
                    r##"<line x1="{px:.1}" y1="{T}" x2="{px:.1}" y2="{}" stroke="#d62728" stroke-dasharray="4 3"/><text x="{:.1}" y="{}" fill="#d62728">{}</text>"##,
                    H - B,
                    px + 3.0,
                    T + 12.0,
                    esc(text)
                );
            }
        }
        s.push_str("</svg>\n");
        s
    }
}

/// Reduce a long series to at most `2·columns` points, keeping each column's minimum and
/// maximum so that short downward spikes stay visible.
pub fn min_max_decimate(points: &[(f64, f64)], columns: usize) -> Vec<(f64, f64)> {
    if points.len() <= 2 * columns || columns == 0 {
        return points.to_vec();
    }
    let per = points.len().div_ceil(columns);
    let mut out = Vec::with_capacity(2 * columns);
    for chunk in points.chunks(per) {
        let lo = chunk.iter().min_by(|a, b| a.1.total_cmp(&b.1));
        let hi = chunk.iter().max_by(|a, b| a.1.total_cmp(&b.1));
        if let (Some(lo), Some(hi)) = (lo, hi) {
            if lo.0 <= hi.0 {
                out.extend([*lo, *hi]);
            } else {
                out.extend([*hi, *lo]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_wellformed_svg_with_spikes_kept() {
        let pts: Vec<(f64, f64)> = (0..10_000)
            .map(|i| (i as f64, if i == 5000 { 0.0 } else { 1000.0 }))
            .collect();
        let d = min_max_decimate(&pts, 500);
        assert!(d.len() <= 1000);
        assert!(d.iter().any(|p| p.1 == 0.0), "spike lost");
        let mut c = Chart::new("t <&>", Axis::linear("x"), Axis::log("y"));
        c.lines.push(Line {
            label: "a".into(),
            points: d,
        });
        c.bars.push((1.0, 2.0, 10.0));
        c.markers.push((3.0, "100 Hz".into()));
        let svg = c.render();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;&amp;&gt;"));
        assert!(!svg.contains("NaN"));
    }
}
