//! Kubernetes quantities (`resource.Quantity`): apimachinery's parser (its grammar, errors and
//! rounding up to nano units), exact comparison, and the canonical form the API server prints
//! a quantity in (`2000m` is `"2"`, `1024Mi` is `"1Gi"`).

use std::cmp::Ordering;
use std::fmt;

/// The parser's errors, worded as apimachinery's (`ErrFormatWrong`, `ErrSuffix`).
pub const FORMAT_WRONG: &str =
    "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'";
pub const BAD_SUFFIX: &str = "unable to parse quantity's suffix";

const NANOS_PER_UNIT: i128 = 1_000_000_000;
const SUFFIX_LETTERS: &[u8] = b"eEinumkKMGTP";
const DECIMAL_SUFFIXES: [(&str, i32); 10] = [
    ("n", -9),
    ("u", -6),
    ("m", -3),
    ("", 0),
    ("k", 3),
    ("M", 6),
    ("G", 9),
    ("T", 12),
    ("P", 15),
    ("E", 18),
];
const BINARY_SUFFIXES: [(&str, u32); 7] = [
    ("", 0),
    ("Ki", 10),
    ("Mi", 20),
    ("Gi", 30),
    ("Ti", 40),
    ("Pi", 50),
    ("Ei", 60),
];

/// How a quantity was written, which decides how it is printed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `12e6`
    DecimalExponent,
    /// `12Mi`
    BinarySI,
    /// `12M`
    DecimalSI,
}

/// A parsed quantity, held exactly in nano units (saturating far beyond any real resource).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity {
    nanos: i128,
    format: Format,
}

/// The pieces of `[sign] digits [. digits] [suffix]` as apimachinery's scanner splits them.
struct Scanned<'a> {
    negative: bool,
    whole: &'a str,
    fraction: &'a str,
    suffix: &'a str,
}

impl Quantity {
    /// Parses `text` as the API server does; the error is its message.
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        if text.is_empty() {
            return Err(FORMAT_WRONG);
        }
        let scanned = scan(text)?;
        let digits = format!("{}{}", scanned.whole, scanned.fraction);
        let mantissa = parse_digits(&digits);
        let places = i32::try_from(scanned.fraction.len()).unwrap_or(i32::MAX);
        let (magnitude, format) = match interpret_suffix(scanned.suffix)? {
            Suffix::Decimal(exponent, format) => {
                (scale10(mantissa, exponent.saturating_sub(places)), format)
            }
            Suffix::Binary(shift) => {
                let shifted = mantissa.saturating_mul(1i128 << shift);
                let capped = scale10(shifted, -places).min(i128::from(i64::MAX) * NANOS_PER_UNIT);
                (capped, Format::BinarySI)
            }
        };
        let nanos = if scanned.negative {
            -magnitude
        } else {
            magnitude
        };
        Ok(Self { nanos, format })
    }

    pub fn is_zero(&self) -> bool {
        self.nanos == 0
    }

    pub fn is_negative(&self) -> bool {
        self.nanos < 0
    }

    /// A whole number of units (what `must be an integer` checks).
    pub fn is_integer(&self) -> bool {
        self.nanos % NANOS_PER_UNIT == 0
    }
}

impl PartialOrd for Quantity {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Quantity {
    fn cmp(&self, other: &Self) -> Ordering {
        self.nanos.cmp(&other.nanos)
    }
}

impl fmt::Display for Quantity {
    /// The canonical form (`Quantity.String()`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nanos == 0 {
            return f.write_str("0");
        }
        if self.format == Format::BinarySI
            && self.nanos.abs() >= 1024 * NANOS_PER_UNIT
            && self.is_integer()
        {
            return f.write_str(&binary_form(self.nanos / NANOS_PER_UNIT));
        }
        f.write_str(&decimal_form(self.nanos, self.format))
    }
}

enum Suffix {
    /// A power of ten, and whether it was an SI letter or an exponent.
    Decimal(i32, Format),
    /// A power of two.
    Binary(u32),
}

fn interpret_suffix(suffix: &str) -> Result<Suffix, &'static str> {
    if let Some((_, exponent)) = DECIMAL_SUFFIXES.iter().find(|(s, _)| *s == suffix) {
        return Ok(Suffix::Decimal(*exponent, Format::DecimalSI));
    }
    if let Some((_, shift)) = BINARY_SUFFIXES.iter().find(|(s, _)| *s == suffix) {
        return Ok(Suffix::Binary(*shift));
    }
    let exponent = suffix
        .strip_prefix(['e', 'E'])
        .filter(|rest| !rest.is_empty())
        .and_then(|rest| rest.parse::<i64>().ok())
        .ok_or(BAD_SUFFIX)?;
    let exponent =
        i32::try_from(exponent).unwrap_or(if exponent < 0 { i32::MIN } else { i32::MAX });
    Ok(Suffix::Decimal(exponent, Format::DecimalExponent))
}

/// apimachinery's `parseQuantityString`: sign, digits, an optional fraction, then suffix
/// letters, an optional sign and digits; anything else is `FORMAT_WRONG`.
fn scan(text: &str) -> Result<Scanned<'_>, &'static str> {
    let bytes = text.as_bytes();
    let mut pos = 0;
    let negative = bytes.first() == Some(&b'-');
    if matches!(bytes.first(), Some(b'-' | b'+')) {
        pos = 1;
    }
    let whole_start = pos;
    pos += count(&bytes[pos..], |b| b.is_ascii_digit());
    let whole = &text[whole_start..pos];
    let mut fraction = "";
    if bytes.get(pos) == Some(&b'.') {
        let start = pos + 1;
        pos = start + count(&bytes[start..], |b| b.is_ascii_digit());
        fraction = &text[start..pos];
    }
    let suffix_start = pos;
    pos += count(&bytes[pos..], |b| SUFFIX_LETTERS.contains(&b));
    if matches!(bytes.get(pos), Some(b'-' | b'+')) {
        pos += 1;
    }
    pos += count(&bytes[pos..], |b| b.is_ascii_digit());
    if pos != bytes.len() {
        return Err(FORMAT_WRONG);
    }
    Ok(Scanned {
        negative,
        whole,
        fraction,
        suffix: &text[suffix_start..],
    })
}

fn count(bytes: &[u8], pred: impl Fn(u8) -> bool) -> usize {
    bytes.iter().take_while(|b| pred(**b)).count()
}

/// Decimal digits as a number (empty is 0), saturating.
fn parse_digits(digits: &str) -> i128 {
    digits.bytes().fold(0i128, |acc, d| {
        acc.saturating_mul(10).saturating_add(i128::from(d - b'0'))
    })
}

/// `mantissa × 10^exponent` in nano units, rounded up (away from zero) below a nano.
fn scale10(mantissa: i128, exponent: i32) -> i128 {
    let shift = i64::from(exponent) + 9;
    if shift >= 0 {
        (0..shift.min(40)).fold(mantissa, |acc, _| acc.saturating_mul(10))
    } else {
        let divisor = (0..(-shift).min(38)).fold(1i128, |acc, _| acc.saturating_mul(10));
        let quotient = mantissa / divisor;
        if mantissa % divisor == 0 {
            quotient
        } else {
            quotient + 1
        }
    }
}

/// `1Gi`, `1536Mi`: the largest power of 1024 that divides the value.
fn binary_form(units: i128) -> String {
    let mut mantissa = units;
    let mut index = 0;
    while index + 1 < BINARY_SUFFIXES.len() && mantissa % 1024 == 0 {
        mantissa /= 1024;
        index += 1;
    }
    format!("{mantissa}{}", BINARY_SUFFIXES[index].0)
}

/// `1500m`, `2`, `5k`, `1e3`: the largest power of 1000 that divides the value.
fn decimal_form(nanos: i128, format: Format) -> String {
    let mut mantissa = nanos;
    let mut exponent: i32 = -9;
    while mantissa % 1000 == 0 && exponent < 18 {
        mantissa /= 1000;
        exponent += 3;
    }
    let suffix = match format {
        Format::DecimalExponent if exponent == 0 => String::new(),
        Format::DecimalExponent => format!("e{exponent}"),
        _ => DECIMAL_SUFFIXES
            .iter()
            .find(|(_, e)| *e == exponent)
            .map(|(s, _)| (*s).to_owned())
            .unwrap_or_default(),
    };
    format!("{mantissa}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(text: &str) -> Quantity {
        Quantity::parse(text).unwrap()
    }

    #[test]
    fn the_grammar_accepts_what_apimachinery_accepts() {
        for ok in [
            "0", "1", "+1", "-1", "1.5", "1.", ".5", "500m", "2Gi", "1e3", "1E-3", "1e+3", "12n",
            "3u", "1k", "1M", "1G", "1T", "1P", "1E", "1Ki", "1Mi", "1Ti", "1Pi", "1Ei", "Gi",
        ] {
            assert!(Quantity::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn the_grammar_refuses_with_the_real_errors() {
        for (bad, error) in [
            ("", FORMAT_WRONG),
            ("lots", FORMAT_WRONG),
            ("1.5.5", FORMAT_WRONG),
            ("1 Gi", FORMAT_WRONG),
            ("1Gb", FORMAT_WRONG),
            ("25%", FORMAT_WRONG),
            ("1K", BAD_SUFFIX),
            ("1MM", BAD_SUFFIX),
            ("32MMi", BAD_SUFFIX),
            ("1e", BAD_SUFFIX),
            ("1Kii", BAD_SUFFIX),
        ] {
            assert_eq!(Quantity::parse(bad), Err(error), "{bad:?}");
        }
    }

    #[test]
    fn quantities_compare_by_value() {
        assert_eq!(q("1"), q("1000m").max(q("1")));
        assert!(q("1500m") > q("1"));
        assert!(q("1Gi") > q("1G"));
        assert_eq!(q("1Gi").cmp(&q("1024Mi")), Ordering::Equal);
        assert!(q("-1") < q("0"));
        assert!(q("1n") > q("0"));
        assert_eq!(
            q("0.1n").cmp(&q("1n")),
            Ordering::Equal,
            "rounded up to a nano"
        );
    }

    #[test]
    fn the_canonical_form_is_the_servers() {
        for (input, shown) in [
            ("2000m", "2"),
            ("1500m", "1500m"),
            ("0.5", "500m"),
            ("1024Mi", "1Gi"),
            ("1536Mi", "1536Mi"),
            ("1.5Gi", "1536Mi"),
            ("512", "512"),
            ("1e3", "1e3"),
            ("1000", "1k"),
            ("16Gi", "16Gi"),
            ("-1", "-1"),
            ("0", "0"),
        ] {
            assert_eq!(q(input).to_string(), shown, "{input}");
        }
    }

    #[test]
    fn integer_and_sign() {
        assert!(q("2").is_integer());
        assert!(!q("500m").is_integer());
        assert!(q("-1").is_negative());
        assert!(q("0m").is_zero());
    }
}
