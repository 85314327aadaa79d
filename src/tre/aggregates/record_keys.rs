//! The cell key method's record keys: a 32-bit number per patient, fixed
//! by the TRE's perturbation key, and the `gpdp_record_key` function the
//! compiled plan sums into cell keys (disclosure control folds and reads
//! them: `crate::tre::control::ckm`). [`contributors`](super::contributors)
//! computes the same keys inside its aggregate.
//!
//! Record keys are SipHash-2-4 of the patient's integer key under 128 bits
//! derived from the perturbation key by HMAC-SHA256 (docs/design.md §5.4 asks for
//! HMAC-SHA256 of patient_id itself; SipHash is a keyed PRF too, and is
//! computed once per patient and cell, where HMAC cost 0.4 µs — more than
//! the whole query on large tables). Record keys are never released or
//! logged.

use std::hash::Hasher;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::Array;
use datafusion::arrow::array::{ArrayRef, AsArray, Int64Array};
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::common::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use ring::hmac;
use siphasher::sip::SipHasher24;

use crate::deid::key::{CollectionKey, KeyError};
use crate::deid::pseudonym::Pseudonymiser;

const RECORD_KEY_DOMAIN: &[u8] = b"gpdp/v1/ckm-record-keys\0";
const KEY_ID_DOMAIN: &[u8] = b"gpdp/v1/ckm-perturbation-key-id\0";

/// The TRE's record-key function. `Debug` never shows the key.
#[derive(Clone)]
pub struct RecordKeys {
    k0: u64,
    k1: u64,
    /// A public name for the key (16 hex digits of an HMAC of a fixed
    /// text under it): what the audit log binds a store's answers to.
    id: String,
}

impl PartialEq for RecordKeys {
    fn eq(&self, other: &Self) -> bool {
        (self.k0, self.k1) == (other.k0, other.k1)
    }
}

impl Eq for RecordKeys {}

impl std::hash::Hash for RecordKeys {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Not the key: equal keys hash alike, which is all that is needed.
        "gpdp record keys".hash(state);
    }
}

impl std::fmt::Debug for RecordKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordKeys(<secret>)")
    }
}

/// Why the perturbation key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PerturbationKeyError {
    #[error("perturbation key: {0}")]
    Key(#[from] KeyError),
    #[error(
        "{} is the store's collection key; the cell key method needs its own key, held by the TRE (make one with `gpdp keygen`)",
        .0
    )]
    IsCollectionKey(String),
}

impl RecordKeys {
    /// Loads the perturbation key file (32 bytes, mode 0600, as `gpdp
    /// keygen` writes), refusing the store's collection key.
    pub fn load(path: &Path, collection_key_id: &str) -> Result<RecordKeys, PerturbationKeyError> {
        let key = CollectionKey::load(path)?;
        if Pseudonymiser::new(&key).key_id() == collection_key_id {
            return Err(PerturbationKeyError::IsCollectionKey(
                path.display().to_string(),
            ));
        }
        Ok(RecordKeys::from_bytes(key.bytes()))
    }

    pub fn from_bytes(key: &[u8]) -> RecordKeys {
        let mac = hmac::Key::new(hmac::HMAC_SHA256, key);
        let derived = hmac::sign(&mac, RECORD_KEY_DOMAIN);
        let d = derived.as_ref();
        let id = hmac::sign(&mac, KEY_ID_DOMAIN);
        RecordKeys {
            k0: u64::from_le_bytes(d[0..8].try_into().expect("8 bytes")),
            k1: u64::from_le_bytes(d[8..16].try_into().expect("8 bytes")),
            id: crate::digest::hex(&id.as_ref()[..8]),
        }
    }

    /// The key's public id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A patient's record key.
    pub fn record_key(&self, patient_key: i64) -> u32 {
        let mut h = SipHasher24::new_with_keys(self.k0, self.k1);
        h.write(&patient_key.to_le_bytes());
        h.finish() as u32
    }

    /// `gpdp_record_key(patient_key [, rows [, values]])`: the record key,
    /// or with a contribution its [`weighted`] key, as an Int64 (summed in
    /// the plan; disclosure control folds the sum to 32 bits). `values` is
    /// the patient's sum of [`value_key`]s.
    pub fn udf(&self) -> ScalarUDF {
        use datafusion::logical_expr::TypeSignature::Exact;
        ScalarUDF::new_from_impl(RecordKeyUdf {
            keys: Arc::new(self.clone()),
            signature: Signature::one_of(
                vec![
                    Exact(vec![DataType::Int64]),
                    Exact(vec![DataType::Int64, DataType::Int64]),
                    Exact(vec![DataType::Int64, DataType::Int64, DataType::Int64]),
                ],
                Volatility::Immutable,
            ),
        })
    }
}

/// A patient's key for a statistic they contribute `rows` rows (and `sum`)
/// to: their record key mixed with how much they contribute.
///
/// The cell key of a count of patients sums record keys: who contributes
/// is all that count depends on. A count of rows, a sum or a mean also
/// depends on *how much* each patient contributes; were its key only who
/// contributes, two questions over the same patients but different rows
/// (events up to a date, and up to the day before) would carry the same
/// noise, and their difference would be exact — a row, a value or a
/// diagnosis of one patient. Keyed by who and how much, every change in
/// what a statistic is computed from draws fresh noise, and the same rows
/// still give the same answer every time. The mixing is SplitMix64's
/// finaliser over the secret record key and the contribution: the number
/// of rows and, for sums and means, `values` — the wrapping sum of the
/// patient's [`value_key`]s.
///
/// Not the bits of the patient's floating-point total: a total is added
/// up in whatever order the engine meets the rows (partial states merged
/// as partitions finish, rows passed through when partial aggregation is
/// skipped), and `(a + b) + c` need not equal `a + (b + c)` to the last
/// bit. A key of those bits drew fresh noise for the same records from
/// one run to the next, so asking the same mean again and averaging would
/// have worn the noise away. A sum of integers is the same in any order.
///
/// One row and no sum is the record key itself: a patient who contributes
/// one row contributes exactly what a count of patients counts, so a count
/// of rows (or values) over records with one row per patient *is* the count
/// of those patients, and gets the same key and the same answer. Were it
/// keyed apart, `count(*)` and `count(DISTINCT patient_id)` over one row
/// per patient would be two independent draws of one number, and their
/// average would halve the noise's variance (docs/design.md: one draw per set of
/// records, whatever statistic names them).
pub fn weighted(record_key: u32, rows: u64, values: Option<i64>) -> u32 {
    if rows == 1 && values.is_none() {
        return record_key;
    }
    let bits = values.map_or(0, |v| v as u64);
    let mut z = ((u64::from(record_key) << 32) | (rows & 0xFFFF_FFFF))
        ^ bits.rotate_left(17).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    z = mix(z);
    z = mix(z ^ rows.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (z >> 32) as u32
}

/// One value's part of a patient's contribution to a cell key: 32 bits
/// mixed from the value (-0 as 0, every NaN as one), summed per patient in
/// the plan as an Int64 — exactly, in any order, for fewer than 2³¹ rows.
/// It needs no secret: [`weighted`] mixes the sum with the record key.
pub fn value_key(value: f64) -> i64 {
    let bits = if value == 0.0 {
        0
    } else if value.is_nan() {
        f64::NAN.to_bits()
    } else {
        value.to_bits()
    };
    (mix(bits ^ 0xA076_1D64_78BD_642F) >> 32) as i64
}

/// `gpdp_value_key(value)`: [`value_key`] of a Float64 column, null for
/// null (so a patient's sum of them covers exactly the values their total
/// does).
pub fn value_key_udf() -> ScalarUDF {
    ScalarUDF::new_from_impl(ValueKeyUdf {
        signature: Signature::exact(vec![DataType::Float64], Volatility::Immutable),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct ValueKeyUdf {
    signature: Signature,
}

impl ScalarUDFImpl for ValueKeyUdf {
    fn name(&self) -> &str {
        "gpdp_value_key"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let values = arrays[0].as_primitive::<Float64Type>();
        let out: Int64Array = values.iter().map(|v| v.map(value_key)).collect();
        Ok(ColumnarValue::Array(Arc::new(out) as ArrayRef))
    }
}

/// SplitMix64's finaliser: a bijection of 64 bits, well mixed.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct RecordKeyUdf {
    keys: Arc<RecordKeys>,
    signature: Signature,
}

impl ScalarUDFImpl for RecordKeyUdf {
    fn name(&self) -> &str {
        "gpdp_record_key"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let keys = arrays[0].as_primitive::<Int64Type>();
        let rows = arrays.get(1).map(|a| a.as_primitive::<Int64Type>());
        let values = arrays.get(2).map(|a| a.as_primitive::<Int64Type>());
        let out: Int64Array = (0..keys.len())
            .map(|i| {
                let rk = self
                    .keys
                    .record_key(keys.is_valid(i).then(|| keys.value(i))?);
                let Some(rows) = rows else {
                    return Some(i64::from(rk));
                };
                let n = rows.is_valid(i).then(|| rows.value(i))?;
                let v = values.and_then(|v| v.is_valid(i).then(|| v.value(i)));
                Some(i64::from(weighted(rk, n as u64, v)))
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out) as ArrayRef))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_row_is_keyed_as_the_patient_and_more_rows_or_a_sum_draw_afresh() {
        for rk in [0u32, 1, 0xDEAD_BEEF, u32::MAX] {
            assert_eq!(weighted(rk, 1, None), rk);
            assert_ne!(weighted(rk, 2, None), rk);
            assert_ne!(weighted(rk, 1, Some(value_key(3.0))), rk);
            assert_ne!(weighted(rk, 2, None), weighted(rk, 3, None));
        }
    }

    /// The same values give the same key in any order; their
    /// floating-point total need not (the positive control: a key of the
    /// total's bits, as before, drew fresh noise for the same records).
    #[test]
    fn a_patients_values_key_the_same_in_any_order() {
        let values = [0.1, 0.2, 0.3, 1e16, -1e16, 7.25];
        let key = |order: &[usize]| -> (i64, u64) {
            let keys = order.iter().map(|&i| value_key(values[i])).sum();
            let total: f64 = order.iter().map(|&i| values[i]).sum();
            (keys, total.to_bits())
        };
        let (first, first_total) = key(&[0, 1, 2, 3, 4, 5]);
        let mut totals = std::collections::HashSet::new();
        for order in [[5, 4, 3, 2, 1, 0], [2, 0, 1, 4, 3, 5], [3, 0, 4, 1, 2, 5]] {
            let (keys, total) = key(&order);
            assert_eq!(keys, first, "{order:?}");
            totals.insert(total);
        }
        totals.insert(first_total);
        assert!(
            totals.len() > 1,
            "the control: the totals' bits differ by order"
        );
        assert_eq!(value_key(0.0), value_key(-0.0));
        assert_ne!(value_key(1.0), value_key(2.0));
        // Every bit of a value reaches its key: values one bit apart (a
        // value edited in its last digit) never share one, or two
        // questions differing only in that value would share their noise.
        let base = 72.5f64.to_bits();
        for bit in 0..64 {
            let other = f64::from_bits(base ^ (1 << bit));
            if !other.is_nan() {
                assert_ne!(value_key(other), value_key(72.5), "bit {bit}");
            }
        }
        assert!((0..1 << 32).contains(&value_key(-3.5)));
    }

    #[test]
    fn the_collection_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        crate::deid::key::generate(&path).unwrap();
        let id = Pseudonymiser::new(&CollectionKey::load(&path).unwrap()).key_id();
        assert!(matches!(
            RecordKeys::load(&path, &id),
            Err(PerturbationKeyError::IsCollectionKey(_))
        ));
        assert!(RecordKeys::load(&path, "0000000000000000").is_ok());
    }
}
