//! Number ranges as GBNF: every JSON number (integer part and up to 16 fraction digits, no
//! exponent) between two decimal bounds, compared exactly digit by digit (no floating point),
//! each bound inclusive or exclusive.

use crate::error::{GrammarError, Result};
use crate::json_schema::digits_in;

/// Most fraction digits a bounded number is written with.
const FRACTION_DIGITS: usize = 16;

/// A bound as an exact decimal: sign, integer part, fraction digits without trailing zeros.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Dec {
    neg: bool,
    int: u64,
    frac: String,
}

impl Dec {
    /// The decimal `v` prints as (Rust prints an `f64` without exponent, shortest round trip).
    pub(crate) fn from_f64(v: f64, path: &str) -> Result<Dec> {
        if !v.is_finite() || v.abs() >= 1e15 {
            return Err(GrammarError::Schema {
                path: path.to_string(),
                message: format!("number bound {v} is beyond ±10^15"),
            });
        }
        let text = format!("{}", v.abs());
        let (int, frac) = text.split_once('.').unwrap_or((&text, ""));
        let frac = frac.trim_end_matches('0').to_string();
        let int: u64 = int.parse().expect("digits");
        Ok(Dec {
            neg: v < 0.0 && (int > 0 || !frac.is_empty()),
            int,
            frac,
        })
    }

    fn zero() -> Dec {
        Dec {
            neg: false,
            int: 0,
            frac: String::new(),
        }
    }

    fn abs(&self) -> Dec {
        Dec {
            neg: false,
            ..self.clone()
        }
    }

    /// `self` ≤ `other`, both non-negative.
    fn le(&self, other: &Dec) -> bool {
        (self.int, pad(&self.frac)) <= (other.int, pad(&other.frac))
    }
}

fn pad(f: &str) -> String {
    format!("{f:0<20}")
}

/// GBNF alternatives for the numbers in the range (`None`: unbounded on that side; the flag
/// says whether the bound itself is in).
pub(crate) fn number_in(lo: Option<(Dec, bool)>, hi: Option<(Dec, bool)>) -> Vec<String> {
    let mut alts = Vec::new();
    if hi.as_ref().is_none_or(|(h, _)| !h.neg) {
        let from = match &lo {
            Some((l, incl)) if !l.neg => (l.clone(), *incl),
            _ => (Dec::zero(), true),
        };
        alts.extend(non_negative(from, hi.clone()));
    }
    // x = -y; "-0" (and "-0.0") only where 0 itself is in the range.
    let zero_in = lo
        .as_ref()
        .is_none_or(|(l, incl)| l.neg || (*l == Dec::zero() && *incl))
        && hi
            .as_ref()
            .is_none_or(|(h, incl)| !h.neg && (*h != Dec::zero() || *incl));
    if zero_in || lo.as_ref().is_none_or(|(l, _)| l.neg) {
        let from = match &hi {
            Some((h, incl)) if h.neg => (h.abs(), *incl),
            _ => (Dec::zero(), zero_in),
        };
        let to = lo.as_ref().map(|(l, incl)| (l.abs(), *incl));
        alts.extend(non_negative(from, to).into_iter().map(|a| format!(r#""-" {a}"#)));
    }
    alts
}

/// Numbers y ≥ 0 from `a` to `b` (unbounded above when `None`).
fn non_negative((a, a_in): (Dec, bool), b: Option<(Dec, bool)>) -> Vec<String> {
    let lit = |n: u64| format!("\"{n}\"");
    let any_fraction = format!(r#"("." [0-9]{{1,{FRACTION_DIGITS}}})?"#);
    let lo_frac = Some((a.frac.as_str(), a_in));
    let mut out = Vec::new();
    let with_fraction = |out: &mut Vec<String>, int: u64, f: Vec<String>| {
        if !f.is_empty() {
            out.push(format!(r#"{} "." {}"#, lit(int), group(f)));
        }
    };
    let exact_low = a.frac.is_empty() && a_in;
    match b {
        None => {
            with_fraction(&mut out, a.int, fraction(lo_frac, None, FRACTION_DIGITS, true));
            if exact_low {
                out.push(lit(a.int));
            }
            for p in digits_in(a.int + 1, None) {
                out.push(format!("{p} {any_fraction}"));
            }
        }
        Some((b, b_in)) => {
            if !a.le(&b) || (a == b && !(a_in && b_in)) {
                return out;
            }
            let hi_frac = Some((b.frac.as_str(), b_in));
            let exact_high = !b.frac.is_empty() || b_in;
            if a.int < b.int {
                with_fraction(&mut out, a.int, fraction(lo_frac, None, FRACTION_DIGITS, true));
                if exact_low {
                    out.push(lit(a.int));
                }
                if a.int + 1 < b.int {
                    for p in digits_in(a.int + 1, Some(b.int - 1)) {
                        out.push(format!("{p} {any_fraction}"));
                    }
                }
                with_fraction(&mut out, b.int, fraction(None, hi_frac, FRACTION_DIGITS, true));
                if exact_high {
                    out.push(lit(b.int));
                }
            } else {
                with_fraction(&mut out, a.int, fraction(lo_frac, hi_frac, FRACTION_DIGITS, true));
                if exact_low && exact_high {
                    out.push(lit(a.int));
                }
            }
        }
    }
    out
}

/// Alternatives for fraction digit strings D of at most `room` digits (at least one when
/// `need_one`) whose value 0.D lies within the bounds (digit strings, inclusive flags).
fn fraction(lo: Option<(&str, bool)>, hi: Option<(&str, bool)>, room: usize, need_one: bool) -> Vec<String> {
    let zero = |s: &str| s.bytes().all(|d| d == b'0');
    let mut out = Vec::new();
    // D ends here: the rest is 0.
    let zero_ok = lo.is_none_or(|(s, incl)| zero(s) && incl) && hi.is_none_or(|(s, incl)| !zero(s) || incl);
    if !need_one && zero_ok {
        out.push(r#""""#.to_string());
    }
    if room == 0 {
        return out;
    }
    let (l, h) = (split(lo), split(hi));
    let tail = match room - 1 {
        0 => String::new(),
        n => format!(" [0-9]{{0,{n}}}"),
    };
    // First digits strictly inside the bounds take any tail.
    let first_free = l.map_or(0, |(d, _)| d + 1);
    let last_free = h.map_or(9, |(d, _)| d as i32 - 1);
    if (first_free as i32) <= last_free {
        let class = if first_free as i32 == last_free {
            format!("\"{first_free}\"")
        } else {
            format!("[{first_free}-{last_free}]")
        };
        out.push(format!("{class}{tail}"));
    }
    let mut on = |d: u8, lo: Option<(&str, bool)>, hi: Option<(&str, bool)>| {
        let rest = fraction(lo, hi, room - 1, false);
        if !rest.is_empty() {
            out.push(format!("\"{d}\" {}", group(rest)));
        }
    };
    match (l, h) {
        (Some((ld, lr)), Some((hd, hr))) if ld == hd => on(ld, Some(lr), Some(hr)),
        (Some((ld, lr)), Some((hd, hr))) if ld < hd => {
            on(ld, Some(lr), None);
            on(hd, None, Some(hr));
        }
        (Some(_), Some(_)) => {}
        (Some((ld, lr)), None) => on(ld, Some(lr), None),
        (None, Some((hd, hr))) => on(hd, None, Some(hr)),
        (None, None) => {}
    }
    out
}

/// A bound's first digit (0 past its end) and the rest.
fn split(b: Option<(&str, bool)>) -> Option<(u8, (&str, bool))> {
    b.map(|(s, incl)| {
        (
            s.bytes().next().map_or(0, |d| d - b'0'),
            (s.get(1..).unwrap_or(""), incl),
        )
    })
}

fn group(alts: Vec<String>) -> String {
    if alts.len() == 1 {
        alts.into_iter().next().expect("one")
    } else {
        format!("({})", alts.join(" | "))
    }
}
