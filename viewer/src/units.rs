//! Units a person reads at a glance: bytes in KiB / MiB / GiB, durations in
//! µs / ms / s, rates and ratios.

/// Bytes with a binary unit and three significant digits: `512 B`,
/// `1.50 KiB`, `135 MiB`, `2.00 GiB`.
pub fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if v >= 100.0 {
        format!("{v:.0} {}", UNITS[u])
    } else if v >= 10.0 {
        format!("{v:.1} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// A duration given in microseconds: `850 µs`, `12.3 ms`, `1.25 s`.
pub fn micros(us: u64) -> String {
    if us < 1000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

/// A fraction as a percentage with one decimal: `37.5 %`.
pub fn percent(f: f64) -> String {
    format!("{:.1} %", f * 100.0)
}

/// The nicest step (1, 2 or 5 times a power of 1024 bytes' binary units, in
/// bytes) for about `lines` grid lines over `max` bytes.
pub fn nice_byte_step(max: u64, lines: u64) -> u64 {
    let raw = (max / lines.max(1)).max(1);
    let mut unit = 1u64;
    while unit.saturating_mul(1024) <= raw {
        unit *= 1024;
    }
    for m in [1u64, 2, 5, 10, 20, 50, 100, 200, 500, 1024] {
        if unit.saturating_mul(m) >= raw {
            return unit.saturating_mul(m);
        }
    }
    unit.saturating_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_use_binary_units_and_three_digits() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(bytes(135 << 20), "135 MiB");
        assert_eq!(bytes(20 * (1 << 20) + (1 << 19)), "20.5 MiB");
        assert_eq!(bytes(2 << 30), "2.00 GiB");
    }

    #[test]
    fn durations_pick_their_unit() {
        assert_eq!(micros(850), "850 µs");
        assert_eq!(micros(12_345), "12.3 ms");
        assert_eq!(micros(1_250_000), "1.25 s");
    }

    #[test]
    fn byte_steps_are_round() {
        assert_eq!(nice_byte_step(1000 << 20, 5), 200 << 20);
        assert_eq!(nice_byte_step(3 << 30, 4), 1 << 30);
    }
}
