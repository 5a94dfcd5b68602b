//! 2-D heat equation, Jacobi iteration on an N x N grid split over a process grid with halo
//! exchange; rank 0 gathers the result and checks it against a serial solve (same arithmetic,
//! so the answers must agree exactly). Run: `yod -n 6 target/debug/examples/heat --n 96 --iters 200`.
//!
//! Boundary: the top edge is held at 1.0, the other edges at 0.0; the interior starts at 0.

use clap::Parser;
use puma::{Comm, Error, Result};

/// Solve the heat equation with Jacobi iterations on a process grid.
#[derive(Parser)]
struct Args {
    /// Interior grid points per side.
    #[arg(long, default_value_t = 64)]
    n: usize,
    /// Jacobi iterations.
    #[arg(long, default_value_t = 100)]
    iters: usize,
}

/// Process grid rows x cols as square as possible.
fn grid(p: u32) -> (u32, u32) {
    let mut r = (p as f64).sqrt() as u32;
    while r > 1 && p % r != 0 {
        r -= 1;
    }
    (r.max(1), p / r.max(1))
}

fn span(n: usize, parts: u32, i: u32) -> (usize, usize) {
    let (p, i) = (parts as usize, i as usize);
    (i * n / p, (i + 1) * n / p)
}

/// Serial reference: (n+2)^2 grid with boundary.
fn serial(n: usize, iters: usize) -> Vec<f64> {
    let m = n + 2;
    let mut u = vec![0.0; m * m];
    u[..m].fill(1.0);
    let mut v = u.clone();
    for _ in 0..iters {
        for i in 1..=n {
            for j in 1..=n {
                v[i * m + j] = 0.25
                    * (u[(i - 1) * m + j]
                        + u[(i + 1) * m + j]
                        + u[i * m + j - 1]
                        + u[i * m + j + 1]);
            }
        }
        std::mem::swap(&mut u, &mut v);
    }
    u
}

fn solve(w: &Comm, a: &Args) -> Result<Option<Vec<f64>>> {
    let (pr, pc) = grid(w.size());
    let me = w.rank();
    let (gr, gc) = (me / pc, me % pc);
    let (r0, r1) = span(a.n, pr, gr);
    let (c0, c1) = span(a.n, pc, gc);
    let (h, wd) = (r1 - r0, c1 - c0);
    let m = wd + 2;
    // Local block with a one-cell halo; global interior row i is local row i - r0 + 1.
    let mut u = vec![0.0f64; (h + 2) * m];
    if gr == 0 {
        u[..m].fill(1.0);
    }
    let mut v = u.clone();
    let up = (gr > 0).then(|| me - pc);
    let down = (gr + 1 < pr).then(|| me + pc);
    let left = (gc > 0).then(|| me - 1);
    let right = (gc + 1 < pc).then(|| me + 1);
    for _ in 0..a.iters {
        // Halo exchange: rows up/down, columns left/right.
        if let Some(p) = up {
            let row = u[m..2 * m].to_vec();
            let mut got = vec![0.0; m];
            w.sendrecv(&row, p, 1, &mut got, p, 2)?;
            u[..m].copy_from_slice(&got);
        }
        if let Some(p) = down {
            let row = u[h * m..(h + 1) * m].to_vec();
            let mut got = vec![0.0; m];
            w.sendrecv(&row, p, 2, &mut got, p, 1)?;
            u[(h + 1) * m..(h + 2) * m].copy_from_slice(&got);
        }
        if let Some(p) = left {
            let col: Vec<f64> = (1..=h).map(|i| u[i * m + 1]).collect();
            let mut got = vec![0.0; h];
            w.sendrecv(&col, p, 3, &mut got, p, 4)?;
            for i in 1..=h {
                u[i * m] = got[i - 1];
            }
        }
        if let Some(p) = right {
            let col: Vec<f64> = (1..=h).map(|i| u[i * m + wd]).collect();
            let mut got = vec![0.0; h];
            w.sendrecv(&col, p, 4, &mut got, p, 3)?;
            for i in 1..=h {
                u[i * m + wd + 1] = got[i - 1];
            }
        }
        for i in 1..=h {
            for j in 1..=wd {
                v[i * m + j] = 0.25
                    * (u[(i - 1) * m + j]
                        + u[(i + 1) * m + j]
                        + u[i * m + j - 1]
                        + u[i * m + j + 1]);
            }
        }
        // Keep the halo/boundary cells of v equal to u's (boundary rows stay fixed).
        for i in 0..h + 2 {
            v[i * m] = u[i * m];
            v[i * m + wd + 1] = u[i * m + wd + 1];
        }
        v[..m].copy_from_slice(&u[..m]);
        v[(h + 1) * m..].copy_from_slice(&u[(h + 1) * m..]);
        std::mem::swap(&mut u, &mut v);
    }
    // Gather the interiors at rank 0.
    let interior: Vec<f64> = (1..=h)
        .flat_map(|i| u[i * m + 1..i * m + 1 + wd].to_vec())
        .collect();
    if me != 0 {
        w.send(&interior, 0, 9)?;
        return Ok(None);
    }
    let g = a.n + 2;
    let mut full = vec![0.0; g * g];
    full[..g].fill(1.0);
    for r in 0..w.size() {
        let (br, bc) = (r / pc, r % pc);
        let (a0, a1) = span(a.n, pr, br);
        let (b0, b1) = span(a.n, pc, bc);
        let mut blk = vec![0.0; (a1 - a0) * (b1 - b0)];
        if r == 0 {
            blk.copy_from_slice(&interior);
        } else {
            w.recv_exact(&mut blk, r, 9)?;
        }
        for i in a0..a1 {
            for j in b0..b1 {
                full[(i + 1) * g + j + 1] = blk[(i - a0) * (b1 - b0) + (j - b0)];
            }
        }
    }
    Ok(Some(full))
}

fn run(a: &Args) -> Result<()> {
    let u = puma::start()?;
    let w = u.world();
    if let Some(full) = solve(&w, a)? {
        let want = serial(a.n, a.iters);
        let diff = full
            .iter()
            .zip(&want)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        let (pr, pc) = grid(w.size());
        let centre = full[(a.n / 2 + 1) * (a.n + 2) + a.n / 2 + 1];
        println!(
            "heat: {n}x{n} grid, {pr}x{pc} process grid, {} iterations, centre {centre:.6e}, max difference from serial {diff:e}",
            a.iters,
            n = a.n
        );
        if diff > 1e-12 {
            return Err(Error::Invalid(format!(
                "parallel result differs from serial by {diff}"
            )));
        }
    }
    Ok(())
}

fn main() {
    let a = Args::parse();
    if let Err(e) = run(&a) {
        puma::exit_with_error("heat", &e, 1);
    }
}
