//! Slurm host list expansion (`SLURM_JOB_NODELIST`), e.g.
//! `n[01-03,07],gpu5,r[1-2]-c[1-2]` → n01 n02 n03 n07 gpu5 r1-c1 r1-c2 r2-c1 r2-c2.

use crate::error::{Result, YodError};

/// Most hosts one list may expand to (guards against `n[0-999999999]`).
pub const MAX_HOSTS: usize = 65536;

fn err(list: &str, reason: impl Into<String>) -> YodError {
    YodError::Hostlist {
        list: list.into(),
        reason: reason.into(),
    }
}

/// Splits at top-level commas (not inside brackets).
fn split_top(list: &str) -> Result<Vec<&str>> {
    let (mut depth, mut start, mut out) = (0i32, 0usize, Vec::new());
    for (i, c) in list.char_indices() {
        match c {
            '[' => {
                depth += 1;
                if depth > 1 {
                    return Err(err(list, "nested brackets"));
                }
            }
            ']' => {
                depth -= 1;
                if depth < 0 {
                    return Err(err(list, "unbalanced ']'"));
                }
            }
            ',' if depth == 0 => {
                out.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(err(list, "unbalanced '['"));
    }
    out.push(&list[start..]);
    Ok(out)
}

/// Expands one range list like `01-03,07` (zero padding kept).
fn expand_ranges(list: &str, inner: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for part in inner.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if a.is_empty()
            || !a.chars().all(|c| c.is_ascii_digit())
            || !b.chars().all(|c| c.is_ascii_digit())
            || b.is_empty()
        {
            return Err(err(list, format!("bad range {part:?}")));
        }
        let width = a.len();
        let (lo, hi): (u64, u64) = (
            a.parse().map_err(|_| err(list, "number too large"))?,
            b.parse().map_err(|_| err(list, "number too large"))?,
        );
        if hi < lo {
            return Err(err(list, format!("range {part:?} runs backwards")));
        }
        if hi - lo >= MAX_HOSTS as u64 {
            return Err(err(list, format!("range {part:?} is too large")));
        }
        for v in lo..=hi {
            out.push(format!("{v:0width$}"));
        }
    }
    Ok(out)
}

/// Expands a Slurm host list into host names, in order.
pub fn expand(list: &str) -> Result<Vec<String>> {
    let list_t = list.trim();
    if list_t.is_empty() {
        return Err(err(list, "empty"));
    }
    let mut hosts = Vec::new();
    for item in split_top(list_t)? {
        if item.is_empty() {
            return Err(err(list, "empty host name"));
        }
        // Cartesian product over every bracket group in the item.
        let mut acc = vec![String::new()];
        let mut rest = item;
        while let Some(open) = rest.find('[') {
            let close = rest[open..]
                .find(']')
                .map(|c| c + open)
                .ok_or_else(|| err(list, "unbalanced '['"))?;
            let prefix = &rest[..open];
            let alts = expand_ranges(list, &rest[open + 1..close])?;
            let mut next = Vec::with_capacity(acc.len() * alts.len());
            for a in &acc {
                for x in &alts {
                    next.push(format!("{a}{prefix}{x}"));
                }
            }
            if next.len() > MAX_HOSTS {
                return Err(err(list, "expands to too many hosts"));
            }
            acc = next;
            rest = &rest[close + 1..];
        }
        for a in acc {
            hosts.push(format!("{a}{rest}"));
        }
        if hosts.len() > MAX_HOSTS {
            return Err(err(list, "expands to too many hosts"));
        }
    }
    if hosts
        .iter()
        .any(|h| h.contains(']') || h.chars().any(char::is_whitespace))
    {
        return Err(err(list, "stray ']' or space"));
    }
    Ok(hosts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_slurm_syntax() {
        assert_eq!(expand("node1").unwrap(), ["node1"]);
        assert_eq!(
            expand("n[01-03,07],gpu5").unwrap(),
            ["n01", "n02", "n03", "n07", "gpu5"]
        );
        assert_eq!(
            expand("r[1-2]-c[8-9]").unwrap(),
            ["r1-c8", "r1-c9", "r2-c8", "r2-c9"]
        );
        assert_eq!(expand("a[9-11]").unwrap(), ["a9", "a10", "a11"]);
        assert_eq!(expand("x[098-100]b").unwrap(), ["x098b", "x099b", "x100b"]);
    }

    #[test]
    fn rejects_bad_lists() {
        for bad in [
            "",
            "n[1-",
            "n]1",
            "n[3-1]",
            "n[a-b]",
            "n[[1]]",
            "a,,b",
            "n[0-99999999]",
            "n[1-2",
        ] {
            assert!(expand(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
