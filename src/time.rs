//! Timestamp rules of the original.
//!
//! The REST API accepts any ISO-8601 date or date-time (class-validator `IsISO8601`, non-strict),
//! while the server's envelope check demands JavaScript's `Date.prototype.toISOString()` form,
//! e.g. `2024-01-15T10:30:00.000Z` (compat §5).

use chrono::{NaiveDate, SecondsFormat, Utc};

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
    chrono::DateTime::parse_from_rfc3339(s).is_ok() && is_iso8601(s)
}

/// True for an ISO-8601 calendar date, optionally followed by a time and a zone:
/// `YYYY`, `YYYY-MM`, `YYYY-MM-DD`, then `T` or space, `HH[:MM[:SS[.fff]]]`, then `Z` or `±HH[:MM]`.
/// Dates must exist (no 30 February).
pub fn is_iso8601(s: &str) -> bool {
    let mut p = Parser { b: s.as_bytes(), i: 0 };
    if !p.date() {
        return false;
    }
    if p.done() {
        return true;
    }
    if !(p.eat(b'T') || p.eat(b' ')) || !p.time() {
        return false;
    }
    if p.done() {
        return true;
    }
    p.zone() && p.done()
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn done(&self) -> bool {
        self.i == self.b.len()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn digits(&mut self, n: usize) -> Option<u32> {
        let slice = self.b.get(self.i..self.i + n)?;
        if !slice.iter().all(u8::is_ascii_digit) {
            return None;
        }
        self.i += n;
        Some(slice.iter().fold(0, |acc, d| acc * 10 + u32::from(d - b'0')))
    }

    fn date(&mut self) -> bool {
        let Some(year) = self.digits(4) else { return false };
        if self.done() {
            return true;
        }
        if !self.eat(b'-') {
            return false;
        }
        let Some(month) = self.digits(2) else { return false };
        if !(1..=12).contains(&month) {
            return false;
        }
        if self.done() {
            return true;
        }
        if !self.eat(b'-') {
            return false;
        }
        let Some(day) = self.digits(2) else { return false };
        #[allow(clippy::cast_possible_wrap)]
        NaiveDate::from_ymd_opt(year as i32, month, day).is_some()
    }

    fn time(&mut self) -> bool {
        let Some(hour) = self.digits(2) else { return false };
        if hour > 23 {
            return false;
        }
        if !self.eat(b':') {
            return true;
        }
        let Some(minute) = self.digits(2) else { return false };
        if minute > 59 {
            return false;
        }
        if !self.eat(b':') {
            return true;
        }
        let Some(second) = self.digits(2) else { return false };
        if second > 59 {
            return false;
        }
        if self.eat(b'.') || self.eat(b',') {
            let start = self.i;
            while self.b.get(self.i).is_some_and(u8::is_ascii_digit) {
                self.i += 1;
            }
            return self.i > start;
        }
        true
    }

    fn zone(&mut self) -> bool {
        if self.eat(b'Z') || self.eat(b'z') {
            return true;
        }
        if !(self.eat(b'+') || self.eat(b'-')) {
            return false;
        }
        let Some(hour) = self.digits(2) else { return false };
        if hour > 23 {
            return false;
        }
        if self.done() {
            return true;
        }
        self.eat(b':');
        self.digits(2).is_some_and(|m| m <= 59)
    }
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
            "2024-01-15 10:30:00.123456-0530",
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
            "2024-01-15T10:30:00Zjunk",
            "15.01.2024",
        ] {
            assert!(!is_iso8601(bad), "{bad}");
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
            "2024-01-15",
        ] {
            assert!(!is_js_iso_string(bad), "{bad}");
        }
    }
}
