//! Instants as the request log shows and takes them: unix milliseconds to and from RFC 3339
//! text in UTC (`2026-11-23T10:00:00.123Z`), and unix seconds as input. Two conversions and a
//! parser are all the gateway needs, so they live here rather than in a date library.

/// Milliseconds in a day (UTC days have no leap seconds in unix time).
pub(crate) const MS_PER_DAY: i64 = 86_400_000;

/// Days before each month in a common year.
const DAYS_BEFORE_MONTH: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];

/// The years RFC 3339 text can hold: four digits, and 0000 has no place in our calendar.
const FIRST_YEAR: i64 = 1;
const LAST_YEAR: i64 = 9999;

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 0001-01-01 to the first day of `year` (Gregorian calendar throughout).
fn days_before_year(year: i64) -> i64 {
    let y = year - 1;
    365 * y + y / 4 - y / 100 + y / 400
}

/// 1970-01-01 counted from 0001-01-01.
const UNIX_EPOCH_DAY: i64 = 719_162;

/// Days since 1970-01-01 of a valid date in years 1..=9999.
fn days_from_date(year: i64, month: i64, day: i64) -> i64 {
    let leap_day = i64::from(month > 2 && is_leap(year));
    days_before_year(year) + DAYS_BEFORE_MONTH[(month - 1) as usize] + leap_day + day
        - 1
        - UNIX_EPOCH_DAY
}

/// The date of a day counted from 1970-01-01, clamped to years 1..=9999.
fn date_from_days(days: i64) -> (i64, i64, i64) {
    let first = days_from_date(FIRST_YEAR, 1, 1);
    let last = days_from_date(LAST_YEAR, 12, 31);
    let since_year_one = days.clamp(first, last) + UNIX_EPOCH_DAY;
    // A 365-day guess is never early by more than a year's worth of leap days; step back.
    let mut year = (since_year_one / 365 + 1).min(LAST_YEAR);
    while days_before_year(year) > since_year_one {
        year -= 1;
    }
    let mut left = since_year_one - days_before_year(year);
    let mut month = 1;
    while left >= days_in_month(year, month) {
        left -= days_in_month(year, month);
        month += 1;
    }
    (year, month, left + 1)
}

/// `2026-11-23T10:00:00.123Z`: the instant `ms` after the epoch, in UTC, to the millisecond.
pub(crate) fn format_ms(ms: i64) -> String {
    let days = ms.div_euclid(MS_PER_DAY);
    let in_day = ms.rem_euclid(MS_PER_DAY);
    let (year, month, day) = date_from_days(days);
    let secs = in_day / 1000;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        in_day % 1000
    )
}

/// `2026-11-23`: the UTC day holding the instant `ms` after the epoch.
pub(crate) fn format_day(ms: i64) -> String {
    let (year, month, day) = date_from_days(ms.div_euclid(MS_PER_DAY));
    format!("{year:04}-{month:02}-{day:02}")
}

/// What a time parameter accepts, for error messages.
pub(crate) const INSTANT_FORMS: &str =
    "unix seconds or an RFC 3339 time such as 2026-11-23T10:00:00Z";

/// Reads an instant given as unix seconds (`1795428000`) or as RFC 3339 text
/// (`2026-11-23T10:00:00Z`, with optional fractional seconds and a `Z` or `±HH:MM` offset);
/// returns unix milliseconds, or `None` when the text is neither.
pub(crate) fn parse_instant(text: &str) -> Option<i64> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse::<i64>().ok()?.checked_mul(1000);
    }
    parse_rfc3339(text)
}

fn parse_rfc3339(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    // The fixed part: `YYYY-MM-DDTHH:MM:SS`.
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't') {
        return None;
    }
    let year = digits(&b[0..4])?;
    let month = digits(&b[5..7])?;
    let day = digits(&b[8..10])?;
    let hour = digits(&b[11..13])?;
    let minute = digits(&b[14..16])?;
    // 60 is a leap second; unix time has none, so it reads as the next minute's first second.
    let second = digits(&b[17..19])?;
    if year < FIRST_YEAR
        || !(1..=12).contains(&month)
        || !(1..=days_in_month(year, month)).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &b[19..];
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix(b".") {
        let len = fraction.iter().take_while(|c| c.is_ascii_digit()).count();
        if len == 0 {
            return None;
        }
        // Milliseconds are what the log keeps; finer digits are dropped, not rounded.
        for (i, d) in fraction[..len.min(3)].iter().enumerate() {
            millis += i64::from(d - b'0') * [100, 10, 1][i];
        }
        rest = &fraction[len..];
    }
    let offset_minutes = match rest {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let (hours, minutes) = (digits(&[*h1, *h2])?, digits(&[*m1, *m2])?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            let offset = hours * 60 + minutes;
            if *sign == b'-' {
                -offset
            } else {
                offset
            }
        }
        _ => return None,
    };
    let days = days_from_date(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    Some(seconds * 1000 + millis)
}

/// ASCII digits as a number; `None` if any byte is not a digit.
fn digits(bytes: &[u8]) -> Option<i64> {
    bytes.iter().try_fold(0i64, |n, b| {
        b.is_ascii_digit().then(|| n * 10 + i64::from(b - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_are_formatted_in_utc_to_the_millisecond() {
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ms(1_795_428_000_123), "2026-11-23T10:00:00.123Z");
        // Leap days, the century rules, the last millisecond of a year.
        assert_eq!(format_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_ms(4_107_542_400_000), "2100-03-01T00:00:00.000Z");
        assert_eq!(format_ms(1_735_689_599_999), "2024-12-31T23:59:59.999Z");
        assert_eq!(format_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(format_day(1_795_428_000_123), "2026-11-23");
        // Out of the four-digit years: clamped, never a malformed string.
        assert!(format_ms(i64::MAX).starts_with("9999-12-31T"));
        assert!(format_ms(i64::MIN).starts_with("0001-01-01T"));
    }

    #[test]
    fn every_day_of_four_centuries_round_trips() {
        let first = days_from_date(1900, 1, 1);
        let last = days_from_date(2300, 12, 31);
        let mut expected = (1900, 1, 1);
        for days in first..=last {
            assert_eq!(date_from_days(days), expected, "day {days}");
            let (y, m, d) = expected;
            expected = if d < days_in_month(y, m) {
                (y, m, d + 1)
            } else if m < 12 {
                (y, m + 1, 1)
            } else {
                (y + 1, 1, 1)
            };
        }
    }

    #[test]
    fn unix_seconds_and_rfc3339_text_are_parsed() {
        let at = 1_795_428_000_000;
        assert_eq!(parse_instant("1795428000"), Some(at));
        assert_eq!(parse_instant("0"), Some(0));
        assert_eq!(parse_instant("2026-11-23T10:00:00Z"), Some(at));
        assert_eq!(parse_instant("2026-11-23t10:00:00z"), Some(at));
        assert_eq!(parse_instant("2026-11-23T10:00:00.5Z"), Some(at + 500));
        assert_eq!(parse_instant("2026-11-23T10:00:00.123456Z"), Some(at + 123));
        assert_eq!(parse_instant("2026-11-23T12:30:00+02:30"), Some(at));
        assert_eq!(parse_instant("2026-11-23T09:00:00-01:00"), Some(at));
        assert_eq!(
            parse_instant("2024-02-29T00:00:00Z"),
            Some(1_709_164_800_000)
        );
        assert_eq!(parse_instant("1970-01-01T00:00:00Z"), Some(0));
        for ms in [0, 1, 951_782_400_000, at + 999, 253_402_300_799_999] {
            assert_eq!(parse_instant(&format_ms(ms)), Some(ms), "{}", format_ms(ms));
        }
    }

    #[test]
    fn malformed_or_impossible_times_are_refused() {
        for bad in [
            "",
            "-5",
            "1.5",
            "99999999999999999999",
            "2026-11-23",
            "2026-11-23T10:00:00",
            "2026-11-23 10:00:00Z",
            "2026-11-23T10:00Z",
            "2026-13-01T00:00:00Z",
            "2026-00-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-11-23T24:00:00Z",
            "2026-11-23T10:60:00Z",
            "2026-11-23T10:00:61Z",
            "0000-01-01T00:00:00Z",
            "2026-11-23T10:00:00.Z",
            "2026-11-23T10:00:00+0200",
            "2026-11-23T10:00:00+24:00",
            "2026-11-23T10:00:00Zjunk",
            "2026-1a-23T10:00:00Z",
            "２０２６-11-23T10:00:00Z",
        ] {
            assert_eq!(parse_instant(bad), None, "{bad:?}");
        }
    }
}
