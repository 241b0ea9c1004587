//! Go's `time.ParseDuration` syntax, which kubelet's and containerd's configuration files
//! use for durations (`12h`, `1h30m`, `1.5s`, `300ms`).

/// Go's `time.ParseDuration` (`12h`, `1h30m`, `1.5h`, `300ms`, `-2s`, `0`), in
/// nanoseconds: kubelet's durations are written that way.
pub fn parse_go_duration(text: &str) -> Result<i128, String> {
    let err = || format!("{text:?} is not a duration such as 12h, 1h30m or 10s");
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(err());
    }
    let mut total: i128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int, after) = rest.split_at(int_len);
        let (fraction, after) = match after.strip_prefix('.') {
            Some(after) => after.split_at(after.bytes().take_while(u8::is_ascii_digit).count()),
            None => ("", after),
        };
        if int.is_empty() && fraction.is_empty() {
            return Err(err());
        }
        let unit_len = after
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos: i128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(err()),
        };
        let whole: i128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| err())?
        };
        let mut part = whole.checked_mul(unit_nanos).ok_or_else(err)?;
        let mut scale = unit_nanos;
        for digit in fraction.bytes() {
            scale /= 10;
            part += i128::from(digit - b'0') * scale;
        }
        total = total.checked_add(part).ok_or_else(err)?;
        if total > i128::from(i64::MAX) {
            return Err(err()); // Go's durations are i64 nanoseconds
        }
        rest = after;
    }
    Ok(if negative { -total } else { total })
}

/// A duration that must not be negative (a timeout): `None` for text that is not one.
pub fn parse_timeout(text: &str) -> Option<std::time::Duration> {
    let nanos = parse_go_duration(text).ok()?;
    u64::try_from(nanos)
        .ok()
        .map(std::time::Duration::from_nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_read_as_go_reads_them() {
        let s = 1_000_000_000i128;
        for (text, nanos) in [
            ("0", 0),
            ("10s", 10 * s),
            ("12h", 12 * 3600 * s),
            ("1h30m", 5400 * s),
            ("1.5h", 5400 * s),
            (".5s", s / 2),
            ("1.s", s),
            ("300ms", 300_000_000),
            ("2us", 2_000),
            ("2µs", 2_000),
            ("7ns", 7),
            ("+1m", 60 * s),
            ("-2s", -2 * s),
            ("1h0m0s", 3600 * s),
        ] {
            assert_eq!(parse_go_duration(text), Ok(nanos), "{text}");
        }
        for bad in [
            "",
            "1",
            "s",
            "1d",
            "1 h",
            "1h 30m",
            ".s",
            "-",
            "1.2.3s",
            "99999999999h",
        ] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn timeouts_are_not_negative() {
        assert_eq!(
            parse_timeout("1.5s"),
            Some(std::time::Duration::from_millis(1500))
        );
        assert_eq!(parse_timeout("0"), Some(std::time::Duration::ZERO));
        assert_eq!(parse_timeout("-1s"), None);
        assert_eq!(parse_timeout("5"), None);
    }
}
