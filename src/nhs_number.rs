//! NHS numbers: the one direct identifier every GP table shares.
//!
//! An NHS number is ten digits; the tenth is a Modulus 11 check digit over
//! the first nine (weights 10 down to 2). A remainder that would need a check
//! digit of 10 means the nine digits can never form a valid number. gpdp
//! validates every number before it is pseudonymised: a row whose number
//! fails the check is quarantined, never hashed, because a mistyped number
//! would produce a pseudonym that silently splits one patient in two (and
//! would escape the opt-out lists, which are keyed on the correct number).
//!
//! Source: NHS Data Dictionary, "NHS Number" (Modulus 11 algorithm).

use std::fmt;

/// A validated NHS number: exactly ten ASCII digits with a correct check digit.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NhsNumber([u8; 10]);

/// Why a string is not a valid NHS number. Each variant doubles as a
/// quarantine reason, so the names are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NhsNumberError {
    #[error("NHS number is empty")]
    Missing,
    #[error("NHS number must be 10 digits")]
    WrongLength,
    #[error("NHS number contains a character that is not a digit")]
    NotDigits,
    #[error("NHS number fails the Modulus 11 check")]
    CheckDigit,
}

impl NhsNumberError {
    /// The quarantine reason recorded in receipts and `truth/bad_rows.csv`.
    pub fn reason(self) -> &'static str {
        match self {
            NhsNumberError::Missing => "missing_nhs_number",
            NhsNumberError::WrongLength | NhsNumberError::NotDigits => "malformed_nhs_number",
            NhsNumberError::CheckDigit => "invalid_nhs_number",
        }
    }
}

/// The Modulus 11 check digit for nine leading digits (each 0..=9), or
/// `None` when no check digit can make them valid (remainder gives 10).
pub fn check_digit(first_nine: &[u8; 9]) -> Option<u8> {
    let sum: u32 = first_nine
        .iter()
        .zip((2..=10u32).rev())
        .map(|(&d, w)| u32::from(d) * w)
        .sum();
    match 11 - (sum % 11) {
        11 => Some(0),
        10 => None,
        c => Some(c as u8),
    }
}

impl NhsNumber {
    /// Parses exactly ten ASCII digits (no spaces) and checks Modulus 11.
    pub fn parse(bytes: &[u8]) -> Result<NhsNumber, NhsNumberError> {
        if bytes.is_empty() {
            return Err(NhsNumberError::Missing);
        }
        let digits: [u8; 10] = bytes.try_into().map_err(|_| NhsNumberError::WrongLength)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return Err(NhsNumberError::NotDigits);
        }
        let mut nine = [0u8; 9];
        for (n, d) in nine.iter_mut().zip(&digits) {
            *n = d - b'0';
        }
        match check_digit(&nine) {
            Some(c) if c == digits[9] - b'0' => Ok(NhsNumber(digits)),
            _ => Err(NhsNumberError::CheckDigit),
        }
    }

    /// Builds the valid number whose first nine digits are `prefix`
    /// (a value below 10^9), or `None` if that prefix has no valid check digit.
    pub fn from_prefix(prefix: u32) -> Option<NhsNumber> {
        debug_assert!(prefix < 1_000_000_000);
        let mut nine = [0u8; 9];
        let mut rest = prefix;
        for slot in nine.iter_mut().rev() {
            *slot = (rest % 10) as u8;
            rest /= 10;
        }
        let check = check_digit(&nine)?;
        let mut digits = [0u8; 10];
        for (d, n) in digits
            .iter_mut()
            .zip(nine.iter().chain(std::iter::once(&check)))
        {
            *d = b'0' + n;
        }
        Some(NhsNumber(digits))
    }

    /// The ten ASCII digits, as hashed by the pseudonymiser.
    pub fn as_bytes(&self) -> &[u8; 10] {
        &self.0
    }
}

/// Deliberately not the digits: an NHS number must never reach a log or an
/// error message by accident through `{:?}`.
impl fmt::Debug for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NhsNumber(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_data_dictionary_example() {
        assert!(NhsNumber::parse(b"9434765919").is_ok());
    }

    #[test]
    fn rejects_each_kind_of_bad_number() {
        assert_eq!(NhsNumber::parse(b""), Err(NhsNumberError::Missing));
        assert_eq!(
            NhsNumber::parse(b"943476591"),
            Err(NhsNumberError::WrongLength)
        );
        assert_eq!(
            NhsNumber::parse(b"943 476 59"),
            Err(NhsNumberError::NotDigits)
        );
        assert_eq!(
            NhsNumber::parse(b"9434765918"),
            Err(NhsNumberError::CheckDigit)
        );
    }

    #[test]
    fn a_remainder_of_one_has_no_valid_check_digit() {
        // 999000001: sum = 9*10 + 9*9 + 9*8 + 1*2 = 245, 245 mod 11 = 3 -> check 8.
        assert_eq!(check_digit(&[9, 9, 9, 0, 0, 0, 0, 0, 1]), Some(8));
        // Find a prefix whose check would be 10 and make sure it is refused.
        let invalid = (999_000_000u32..999_000_100)
            .find(|p| NhsNumber::from_prefix(*p).is_none())
            .expect("about one prefix in eleven has no check digit");
        assert!(NhsNumber::from_prefix(invalid).is_none());
    }

    proptest! {
        #[test]
        fn every_built_number_parses_and_any_other_check_digit_fails(prefix in 0u32..1_000_000_000, delta in 1u8..10) {
            if let Some(n) = NhsNumber::from_prefix(prefix) {
                prop_assert_eq!(NhsNumber::parse(n.as_bytes()), Ok(n));
                let mut wrong = *n.as_bytes();
                wrong[9] = b'0' + (wrong[9] - b'0' + delta) % 10;
                prop_assert_eq!(NhsNumber::parse(&wrong), Err(NhsNumberError::CheckDigit));
            }
        }
    }
}
