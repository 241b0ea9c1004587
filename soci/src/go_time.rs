//! Modification times as a zTOC holds them: the text Go's `time.Time.MarshalText`
//! writes (RFC 3339 with up to nine fraction digits, trailing zeros dropped). soci
//! writes the builder's local zone; lazysnap writes UTC, and reads any offset.

const SECS_PER_DAY: i64 = 86_400;

/// `secs.nanos` since the epoch in UTC as Go writes it, e.g. `2024-05-01T10:00:00.5Z`;
/// empty for years outside 0-9999, which Go refuses to write (soci then stores "").
pub fn format_utc(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(SECS_PER_DAY);
    let of_day = secs.rem_euclid(SECS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    if !(0..=9999).contains(&year) {
        return String::new();
    }
    let mut text = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    );
    if nanos > 0 {
        let fraction = format!("{nanos:09}");
        text.push('.');
        text.push_str(fraction.trim_end_matches('0'));
    }
    text.push('Z');
    text
}

/// Seconds and nanoseconds since the epoch of an RFC 3339 time (`Z` or `±hh:mm`).
pub fn parse(text: &str) -> Option<(i64, u32)> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        let digits = text.get(from..to)?;
        digits
            .bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| digits.parse().ok())?
    };
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let mut rest = &text[19..];
    let mut nanos = 0u32;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        nanos = fraction[..digits].parse::<u32>().ok()? * 10u32.pow(9 - digits as u32);
        rest = &fraction[digits..];
    }
    let offset = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let hm = [*h1, *h2, *m1, *m2];
            if !hm.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let minutes = i64::from((h1 - b'0') * 10 + (h2 - b'0')) * 60
                + i64::from((m1 - b'0') * 10 + (m2 - b'0'));
            if *sign == b'-' {
                -minutes * 60
            } else {
                minutes * 60
            }
        }
        _ => return None,
    };
    let secs =
        days_from_civil(year, month, day) * SECS_PER_DAY + hour * 3600 + minute * 60 + second
            - offset;
    Some((secs, nanos))
}

/// Year, month, day of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_written_as_go_writes_them() {
        assert_eq!(format_utc(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(
            format_utc(1_714_557_600, 500_000_000),
            "2024-05-01T10:00:00.5Z"
        );
        assert_eq!(format_utc(951_782_400, 1), "2000-02-29T00:00:00.000000001Z");
        assert_eq!(format_utc(-1, 0), "1969-12-31T23:59:59Z");
        assert_eq!(format_utc(253_402_300_800, 0), "", "year 10000");
        assert_eq!(format_utc(-62_167_219_200, 0), "0000-01-01T00:00:00Z");
    }

    #[test]
    fn times_read_back_in_any_zone() {
        for (secs, nanos) in [
            (0, 0),
            (1_714_557_600, 500_000_000),
            (-86_401, 7),
            (951_782_400, 1),
        ] {
            assert_eq!(parse(&format_utc(secs, nanos)), Some((secs, nanos)));
        }
        assert_eq!(
            parse("2024-05-01T12:00:00.25+02:00"),
            Some((1_714_557_600, 250_000_000))
        );
        assert_eq!(parse("2024-05-01T05:30:00-04:30"), Some((1_714_557_600, 0)));
        for bad in [
            "",
            "2024-05-01",
            "2024-13-01T00:00:00Z",
            "2024-05-01T00:00:00",
            "2024-05-01T00:00:00.Z",
            "2024-05-01T00:00:00+2:00",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
