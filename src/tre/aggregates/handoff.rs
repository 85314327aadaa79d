//! How the patient-bounding aggregates ([`super::contributors`] for the
//! cell key method, [`super::bounded`] for differential privacy) hand
//! their partial states from the partitions to the final step: by ticket,
//! not by value.
//!
//! DataFusion carries a partial state as Arrow arrays. Theirs are every
//! fingerprint or entry of the partition — one per span of a patient's
//! rows, millions on a large store — and on the way they were copied
//! whole: into the state's lists, then, for a grouped aggregate, by the
//! repartition's `take` and again by its `concat`. On events by year over
//! 1M patients that was a seventh of the cell key method's cost and an
//! eighth of differential privacy's, for data that never leaves the
//! process. Here a partition hands what it built to the aggregate's
//! [`InFlight`], its state is a ticket, and the final step claims the
//! ticket and keeps what it gets as it is.
//!
//! Between a partition's end and the final step's merge, what is in
//! flight is counted in neither step's memory reservation: the partition
//! has released it and the final step has not yet taken it on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use datafusion::arrow::array::Int64Array;
use datafusion::common::{Result, exec_err};

/// What partitions of one aggregate in one plan have handed over and the
/// final step has not yet claimed. The partial and the final step share
/// it (they share the aggregate function); it is dropped with the plan,
/// so what a cancelled query never claimed goes with it.
///
/// Tickets are unique in the process: a ticket claimed twice, or from
/// another aggregate, finds nothing and the query fails — what a
/// partition handed over is counted once, in its own aggregate, or the
/// query has no answer.
#[derive(Debug)]
pub(crate) struct InFlight<T>(Arc<Mutex<HashMap<i64, T>>>);

/// The process's next ticket.
static NEXT_TICKET: AtomicI64 = AtomicI64::new(1);

/// Puts `item` in `held` under a new ticket.
fn put<T>(held: &mut HashMap<i64, T>, item: T) -> i64 {
    let ticket = NEXT_TICKET.fetch_add(1, Ordering::Relaxed);
    held.insert(ticket, item);
    ticket
}

impl<T> InFlight<T> {
    fn held(&self) -> MutexGuard<'_, HashMap<i64, T>> {
        // A panic while holding the lock leaves the map whole: each
        // operation is one insert or one remove.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds `item`; the ticket to claim it with.
    pub(crate) fn hold(&self, item: T) -> i64 {
        put(&mut self.held(), item)
    }

    /// Holds each item there is; a ticket for each (null where none).
    pub(crate) fn hold_each(&self, items: impl IntoIterator<Item = Option<T>>) -> Int64Array {
        let mut held = self.held();
        items
            .into_iter()
            .map(|item| item.map(|item| put(&mut held, item)))
            .collect()
    }

    /// What `ticket` holds, once; `aggregate` names the aggregate in the
    /// error.
    pub(crate) fn claim(&self, ticket: i64, aggregate: &str) -> Result<T> {
        match self.held().remove(&ticket) {
            Some(item) => Ok(item),
            None => exec_err!("{aggregate}: partial state {ticket} is not held (claimed twice?)"),
        }
    }
}

impl<T> Default for InFlight<T> {
    fn default() -> Self {
        InFlight(Arc::default())
    }
}

impl<T> Clone for InFlight<T> {
    fn clone(&self) -> Self {
        InFlight(self.0.clone())
    }
}

/// What is in flight is not part of what an aggregate computes: two
/// aggregate functions that are otherwise equal are equal.
impl<T> PartialEq for InFlight<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl<T> Eq for InFlight<T> {}
impl<T> std::hash::Hash for InFlight<T> {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Array;

    #[test]
    fn a_ticket_is_claimed_once_and_only_where_it_was_held() {
        let here = InFlight::<Vec<i32>>::default();
        let there = InFlight::<Vec<i32>>::default();
        let a = here.hold(vec![1, 2, 3]);
        let tickets = here.hold_each([Some(vec![4]), None, Some(vec![5, 6])]);
        assert_eq!(tickets.null_count(), 1);
        assert!(
            there.claim(a, "test").is_err(),
            "another aggregate's ticket"
        );
        assert_eq!(here.claim(a, "test").unwrap(), vec![1, 2, 3]);
        let twice = here.claim(a, "test").unwrap_err().to_string();
        assert!(twice.contains("not held"), "{twice}");
        assert_eq!(here.claim(tickets.value(2), "test").unwrap(), vec![5, 6]);
        assert_eq!(here.claim(tickets.value(0), "test").unwrap(), vec![4]);
        assert_ne!(tickets.value(0), a, "tickets are unique");
    }
}
