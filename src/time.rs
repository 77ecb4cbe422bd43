//! Timestamp rules of the original.
//!
//! The REST API accepts any ISO-8601 date or date-time (class-validator `IsISO8601`, non-strict),
//! while the server's envelope check demands JavaScript's `Date.prototype.toISOString()` form,
//! e.g. `2024-01-15T10:30:00.000Z` (compat §5).
//!
//! Parsing is chrono's: each accepted layout is a chrono format, so dates that do not exist
//! (30 February) and out-of-range fields are refused by the library, not by hand-written checks.
//! RFC 3339 allows a lowercase `t` and `z` (its §5.6 note), so both are accepted.

use chrono::format::{Parsed, StrftimeItems};
use chrono::{DateTime, Datelike as _, NaiveDate, SecondsFormat, Utc};

/// The current time in `toISOString` form (millisecond precision, `Z`).
pub fn now_iso() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// True for the exact `YYYY-MM-DDTHH:MM:SS.sssZ` form naming a real instant.
pub fn is_js_iso_string(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 24 || b[23] != b'Z' || b[10] != b'T' || b[19] != b'.' {
        return false;
    }
    DateTime::parse_from_rfc3339(s).is_ok()
}

/// True for an ISO-8601 calendar date, optionally followed by a time and a zone:
/// `YYYY`, `YYYY-MM`, `YYYY-MM-DD`, then `T`/`t` or a space, `HH[:MM[:SS[.fff]]]`, then `Z`/`z`
/// or `±HH[[:]MM]`. Dates must exist (no 30 February).
pub fn is_iso8601(s: &str) -> bool {
    parse_iso8601(s).is_some()
}

/// Parses what [`is_iso8601`] accepts into an instant. A value without a zone is read as UTC
/// (JavaScript reads a date-only value so; for a zoneless date-time the sender's local zone is
/// unknowable here, and UTC is the only choice every agent makes alike).
///
/// The instant must fall in the years 0000–9999 UTC: the server's `toISOString` form has four
/// year digits, so a time an offset pushes past them (`0000-01-01T10+20:00`) could never be sent
/// and is refused here, at the REST API, rather than by the server.
pub fn parse_iso8601(s: &str) -> Option<DateTime<Utc>> {
    parse_iso8601_any_year(s).filter(|d| (0..=9999).contains(&d.year()))
}

fn parse_iso8601_any_year(s: &str) -> Option<DateTime<Utc>> {
    let b = s.as_bytes();
    // chrono's `%Y` also takes signs and more than four digits, and `%#z` skips leading
    // whitespace; the original accepts neither.
    if b.len() < 4 || !b[..4].iter().all(u8::is_ascii_digit) || b.get(4).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    if b.iter()
        .enumerate()
        .any(|(i, c)| c.is_ascii_whitespace() && !(i == 10 && *c == b' '))
    {
        return None;
    }
    if !has_fixed_width_fields(s) {
        return None;
    }
    if b.len() <= 10 {
        return parse_date(s).and_then(|d| d.and_hms_opt(0, 0, 0)).map(|d| d.and_utc());
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    // One spelling for chrono: `T` as separator, `.` before a fraction (ISO 8601 also allows `,`).
    let normal = format!("{}T{}", &s[..10], s[11..].replace(',', "."));
    const LAYOUTS: [&str; 6] = [
        "%Y-%m-%dT%H:%M:%S%.f%#z",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M%#z",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%dT%H%#z",
        "%Y-%m-%dT%H",
    ];
    LAYOUTS.iter().find_map(|layout| parse_date_time(&normal, layout))
}

/// ISO 8601 fields have fixed widths (`2024-01-05T09:03`), while chrono's numeric fields also
/// take fewer digits (`2024-1-5T9:3`); so the part before any fraction or zone must have one of
/// the fixed shapes.
fn has_fixed_width_fields(s: &str) -> bool {
    let end = s
        .char_indices()
        .skip(10)
        .find(|(_, c)| matches!(c, '.' | ',' | 'Z' | 'z' | '+' | '-'))
        .map_or(s.len(), |(i, _)| i);
    let shape: String = s[..end]
        .chars()
        .enumerate()
        .map(|(i, c)| match c {
            '0'..='9' => 'd',
            't' | ' ' if i == 10 => 'T',
            other => other,
        })
        .collect();
    matches!(
        shape.as_str(),
        "dddd" | "dddd-dd" | "dddd-dd-dd" | "dddd-dd-ddTdd" | "dddd-dd-ddTdd:dd" | "dddd-dd-ddTdd:dd:dd"
    )
}

/// `YYYY-MM-DD`, `YYYY-MM` or `YYYY` (the missing parts are the first month or day).
fn parse_date(s: &str) -> Option<NaiveDate> {
    ["%Y-%m-%d", "%Y-%m", "%Y"].iter().find_map(|layout| {
        let mut parsed = Parsed::new();
        chrono::format::parse(&mut parsed, s, StrftimeItems::new(layout)).ok()?;
        if parsed.month().is_none() {
            parsed.set_month(1).ok()?;
        }
        if parsed.day().is_none() {
            parsed.set_day(1).ok()?;
        }
        parsed.to_naive_date().ok()
    })
}

/// A date-time in `layout`; a time given as the hour alone has zero minutes, no zone means UTC.
fn parse_date_time(s: &str, layout: &str) -> Option<DateTime<Utc>> {
    let mut parsed = Parsed::new();
    chrono::format::parse(&mut parsed, s, StrftimeItems::new(layout)).ok()?;
    if parsed.minute().is_none() {
        parsed.set_minute(0).ok()?;
    }
    if parsed.offset().is_some() {
        parsed.to_datetime().ok().map(|d| d.with_timezone(&Utc))
    } else {
        parsed.to_naive_datetime_with_offset(0).ok().map(|d| d.and_utc())
    }
}

/// The instant in `toISOString` form, for a value [`is_iso8601`] accepts.
pub fn to_js_iso_string(s: &str) -> Option<String> {
    parse_iso8601(s).map(|d| d.to_rfc3339_opts(SecondsFormat::Millis, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_non_strict_accepts_the_originals_forms() {
        for ok in [
            "2024-01-15",
            "2024-01-15T10:30:00Z",
            "2024-01-15T10:30:00.000Z",
            "2024-01-15T10:30:00+02:00",
            "2024-01-15T10:30",
            "2024-01-15T10",
            "2024-01-15 10:30:00.123456-0530",
            "2024-01-15T10:30:00,5+02",
            "2024-01",
            "2024",
        ] {
            assert!(is_iso8601(ok), "{ok}");
        }
        for bad in [
            "",
            "yesterday",
            "2024-13-01",
            "2024-02-30",
            "2024-01-15T25:00",
            "2024-01-15T10:60",
            "2024-01-15T10:30:00Zjunk",
            "2024-01-15T10:30:00 +02:00",
            "2024-01-15T",
            "15.01.2024",
            "+2024-01-15",
            "20240-01-15",
            "2024-1-15",
            "2024-01-15T1:30",
            "2024-01-15T10:3",
        ] {
            assert!(!is_iso8601(bad), "{bad}");
        }
    }

    #[test]
    fn rfc3339_lowercase_t_and_z_are_accepted() {
        // RFC 3339 §5.6: "T" and "Z" may be lower case. The hand-written parser refused `t`.
        for ok in [
            "2024-01-15t10:30:00z",
            "2024-01-15t10:30:00.000Z",
            "2024-01-15T10:30:00.000z",
        ] {
            assert!(is_iso8601(ok), "{ok}");
            assert_eq!(
                to_js_iso_string(ok).as_deref(),
                Some("2024-01-15T10:30:00.000Z"),
                "{ok}"
            );
        }
    }

    #[test]
    fn every_accepted_form_converts_to_the_servers_form() {
        for (given, expected) in [
            ("2024-01-15T12:30:00+02:00", "2024-01-15T10:30:00.000Z"),
            ("2024-01-15", "2024-01-15T00:00:00.000Z"),
            ("2024-01", "2024-01-01T00:00:00.000Z"),
            ("2024-01-15T10", "2024-01-15T10:00:00.000Z"),
            ("2024-01-15 10:30:00.123456-0530", "2024-01-15T16:00:00.123Z"),
        ] {
            assert_eq!(to_js_iso_string(given).as_deref(), Some(expected), "{given}");
        }
    }

    #[test]
    fn accepted_instants_stay_within_the_servers_four_digit_years() {
        // Found by fuzzing (fuzz/corpus/timestamp/crash-year-minus-one.txt): the REST API accepted a
        // time whose instant in UTC falls outside 0000–9999, and its conversion
        // (`-0001-12-31T14:00:00.000Z`) is a form the server refuses, so the message could
        // never be sent; it is refused at the REST API instead.
        for out_of_range in [
            "0000-01-01T10+20:00",
            "9999-12-31T23:59:59.999-01:00",
            "9999-12-31T23:30-00:31",
        ] {
            assert!(!is_iso8601(out_of_range), "{out_of_range}");
            assert_eq!(to_js_iso_string(out_of_range), None, "{out_of_range}");
        }
        for (edge, expected) in [
            ("0000-01-01T10+10:00", "0000-01-01T00:00:00.000Z"),
            ("9999-12-31T23:59:59.999Z", "9999-12-31T23:59:59.999Z"),
            ("9999-12-31T22:59:59.999-01:00", "9999-12-31T23:59:59.999Z"),
            ("0000", "0000-01-01T00:00:00.000Z"),
        ] {
            assert_eq!(to_js_iso_string(edge).as_deref(), Some(expected), "{edge}");
        }
    }

    #[test]
    fn js_iso_string_is_exact() {
        assert!(is_js_iso_string("2024-01-15T10:30:00.000Z"));
        assert!(is_js_iso_string(&now_iso()));
        for bad in [
            "2024-01-15T10:30:00Z",
            "2024-01-15T10:30:00.000+00:00",
            "2024-02-30T10:30:00.000Z",
            "2024-01-15t10:30:00.000z",
            "2024-01-15",
        ] {
            assert!(!is_js_iso_string(bad), "{bad}");
        }
    }
}
