//! The Type 1 opt-out rule.
//!
//! A Type 1 opt-out is recorded in the GP record as dated codes: dissent,
//! and (later) dissent withdrawn. The patient's **latest-dated** code
//! decides, as in the Discovery data service. When a dissent and a
//! withdrawal carry the same date the record cannot say which came last, so
//! the tie counts as dissent: an opt-out wrongly honoured costs one record;
//! an opt-out wrongly ignored breaks a promise to a patient.

/// One Type 1 code in a patient's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type1Code {
    Dissent,
    Withdrawn,
}

/// Folds a patient's Type 1 codes, in any order, into their current wish.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Type1State {
    latest: Option<(i32, bool)>,
}

impl Type1State {
    /// Adds one code recorded on `day` (days since 1970-01-01).
    pub fn record(&mut self, day: i32, code: Type1Code) {
        let dissent = code == Type1Code::Dissent;
        self.latest = match self.latest {
            None => Some((day, dissent)),
            Some((d, _)) if day > d => Some((day, dissent)),
            Some((d, was)) if day == d => Some((d, was || dissent)),
            keep => keep,
        };
    }

    /// True when the patient's latest code is a dissent (ties count as dissent).
    pub fn dissents(&self) -> bool {
        matches!(self.latest, Some((_, true)))
    }

    /// The day of the latest code when it is a withdrawal (the opt-out is
    /// withdrawn as of that day).
    pub fn withdrawn_on(&self) -> Option<i32> {
        match self.latest {
            Some((day, false)) => Some(day),
            _ => None,
        }
    }

    /// True when the patient has any Type 1 code at all.
    pub fn has_codes(&self) -> bool {
        self.latest.is_some()
    }
}

/// Convenience over [`Type1State`] for a whole list of codes.
pub fn dissents(codes: impl IntoIterator<Item = (i32, Type1Code)>) -> bool {
    let mut state = Type1State::default();
    for (day, code) in codes {
        state.record(day, code);
    }
    state.dissents()
}

#[cfg(test)]
mod tests {
    use super::Type1Code::{Dissent, Withdrawn};
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn latest_code_wins_and_ties_dissent() {
        assert!(!dissents([]));
        assert!(dissents([(10, Dissent)]));
        assert!(!dissents([(10, Dissent), (20, Withdrawn)]));
        assert!(dissents([(20, Withdrawn), (10, Dissent), (30, Dissent)]));
        assert!(dissents([(10, Withdrawn), (10, Dissent)]));
        assert!(dissents([(10, Dissent), (10, Withdrawn)]));
        assert!(!dissents([(10, Withdrawn)]));
    }

    proptest! {
        /// The rule, stated independently: find the latest day; dissent if any
        /// code on that day is a dissent. Order of the input must not matter.
        #[test]
        fn matches_the_rule_in_any_order(mut codes in proptest::collection::vec((0i32..50, any::<bool>()), 0..20)) {
            let as_codes = |v: &Vec<(i32, bool)>| v.iter().map(|&(d, x)| (d, if x { Dissent } else { Withdrawn })).collect::<Vec<_>>();
            let expected = codes.iter().map(|c| c.0).max()
                .map(|last| codes.iter().any(|&(d, x)| d == last && x))
                .unwrap_or(false);
            prop_assert_eq!(dissents(as_codes(&codes)), expected);
            codes.reverse();
            prop_assert_eq!(dissents(as_codes(&codes)), expected);
        }
    }
}
