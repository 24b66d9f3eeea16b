//! Core masks as SPDK takes them: a hex mask (`0x3`, or bare hex `3`), or a list (`0,1`, `0-3`, `[0,2-3]`).

use crate::BdevError;

/// The most cores a mask may name (a limit in DESIGN.md).
pub const MAX_CORES: usize = 256;

/// Parse `text` into ascending, distinct OS core ids, and check each is one this process may run on.
///
/// # Errors
/// [`BdevError::CoreMask`] naming what is wrong: bad syntax, an empty mask, or a core the machine lacks.
pub fn parse(text: &str) -> Result<Vec<usize>, BdevError> {
    let cores = parse_syntax(text)?;
    let allowed = allowed_cores();
    for &c in &cores {
        if !allowed.contains(&c) {
            return Err(BdevError::CoreMask {
                mask: text.to_string(),
                reason: format!("core {c} is not available on this machine (available: {})", describe(&allowed)),
            });
        }
    }
    Ok(cores)
}

/// Parse without checking the machine.
///
/// # Errors
/// [`BdevError::CoreMask`] for bad syntax or an empty mask.
pub fn parse_syntax(text: &str) -> Result<Vec<usize>, BdevError> {
    let err = |reason: String| BdevError::CoreMask { mask: text.to_string(), reason };
    let t = text.trim();
    if t.is_empty() {
        return Err(err("empty; give a hex mask such as 0x3 or a list such as 0,1".into()));
    }
    let mut cores = Vec::new();
    let is_list = t.starts_with('[') || t.contains(',') || t.contains('-');
    if is_list {
        let inner = t.trim_start_matches('[').trim_end_matches(']');
        for part in inner.split(',') {
            let part = part.trim();
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (part, part),
            };
            let lo: usize = lo.parse().map_err(|_| err(format!("{part:?} is not a core number or range")))?;
            let hi: usize = hi.parse().map_err(|_| err(format!("{part:?} is not a core number or range")))?;
            if lo > hi {
                return Err(err(format!("range {part:?} runs backwards")));
            }
            if hi >= MAX_CORES {
                return Err(err(format!("core {hi} is beyond the {MAX_CORES}-core limit")));
            }
            cores.extend(lo..=hi);
        }
    } else {
        let hex = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).unwrap_or(t);
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(err("not a hex mask (0x3) or a core list (0,1)".into()));
        }
        let digits = hex.trim_start_matches('0');
        if digits.len() * 4 > MAX_CORES {
            return Err(err(format!("mask names cores beyond the {MAX_CORES}-core limit")));
        }
        for (i, ch) in digits.chars().rev().enumerate() {
            let nibble = ch.to_digit(16).unwrap_or(0) as usize;
            for bit in 0..4 {
                if nibble & (1 << bit) != 0 {
                    cores.push(i * 4 + bit);
                }
            }
        }
    }
    cores.sort_unstable();
    cores.dedup();
    if cores.is_empty() {
        return Err(err("names no core".into()));
    }
    Ok(cores)
}

/// Cores this process may run on (its affinity mask).
pub fn allowed_cores() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: we pass the size of the set we own; pid 0 is this thread.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        return (0..n).collect();
    }
    // SAFETY: CPU_ISSET reads the set we own, with an index below CPU_SETSIZE.
    (0..MAX_CORES.min(libc::CPU_SETSIZE as usize)).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
}

/// "0-3,6" style description.
pub fn describe(cores: &[usize]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < cores.len() {
        let start = cores[i];
        let mut end = start;
        while i + 1 < cores.len() && cores[i + 1] == end + 1 {
            i += 1;
            end = cores[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}-{end}"));
        }
        i += 1;
    }
    out
}

/// The hex mask for a set of cores (`0x3`).
pub fn to_hex(cores: &[usize]) -> String {
    let max = cores.iter().copied().max().unwrap_or(0);
    let mut nibbles = vec![0u8; max / 4 + 1];
    for &c in cores {
        nibbles[c / 4] |= 1 << (c % 4);
    }
    let mut s = String::from("0x");
    for n in nibbles.iter().rev() {
        s.push(char::from_digit(u32::from(*n), 16).unwrap_or('0'));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_lists() {
        assert_eq!(parse_syntax("0x3").unwrap(), vec![0, 1]);
        assert_eq!(parse_syntax("3").unwrap(), vec![0, 1]);
        assert_eq!(parse_syntax("0x10").unwrap(), vec![4]);
        assert_eq!(parse_syntax("0,1").unwrap(), vec![0, 1]);
        assert_eq!(parse_syntax("[0,2-3]").unwrap(), vec![0, 2, 3]);
        assert_eq!(parse_syntax("1-1").unwrap(), vec![1]);
        assert_eq!(to_hex(&[0, 1]), "0x3");
        assert_eq!(to_hex(&[4]), "0x10");
        assert_eq!(describe(&[0, 1, 2, 5]), "0-2,5");
    }

    #[test]
    fn bad_masks() {
        for bad in ["", "0x", "0x0", "zz", "3-1", "a,b", "0x1g", "[0,300]"] {
            assert!(parse_syntax(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(parse("0x8000").is_err() || allowed_cores().contains(&15));
    }
}
