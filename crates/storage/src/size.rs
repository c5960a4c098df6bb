//! Human sizes: `10G`, `512M`, `4096`, `1.5T` (binary units).

/// Parses a size such as `10G`, `512M`, `64K` or `4096` (bytes); units are powers of 1024.
/// The result must be a multiple of 512.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        None => (t, 1u64),
        Some((i, _)) => {
            let unit = t[i..].to_ascii_uppercase();
            let m = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                "P" => 1 << 50,
                _ => {
                    return Err(format!(
                        "size {s:?}: unknown unit; use K, M, G, T or P (or bytes)"
                    ))
                }
            };
            (&t[..i], m)
        }
    };
    let bytes = if let Ok(n) = num.parse::<u64>() {
        n.checked_mul(mult)
    } else if let Ok(f) = num.parse::<f64>() {
        let v = f * mult as f64;
        (f.is_finite() && f >= 0.0 && v < u64::MAX as f64).then_some(v as u64)
    } else {
        return Err(format!(
            "size {s:?} is not a number with an optional unit (e.g. 10G, 512M, 4096)"
        ));
    }
    .ok_or_else(|| format!("size {s:?} is too large"))?;
    if bytes == 0 {
        return Err(format!("size {s:?} must be greater than zero"));
    }
    if bytes % 512 != 0 {
        return Err(format!(
            "size {s:?} ({bytes} bytes) is not a multiple of 512 bytes; round it to a multiple of 512 (e.g. {})",
            bytes.div_ceil(512) * 512
        ));
    }
    Ok(bytes)
}

/// Formats a byte count for people: `1.5 GiB`, `512 MiB`, `4096 B`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64;
    let mut u = 0;
    v /= 1024.0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if (v - v.round()).abs() < 0.005 {
        format!("{} {}", v.round() as u64, UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert!(parse_size("1000").unwrap_err().contains("multiple of 512"));
        assert!(parse_size("0").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("5X").is_err());
        assert_eq!(human(1 << 30), "1 GiB");
        assert_eq!(human(1536 << 20), "1.50 GiB");
    }
}
