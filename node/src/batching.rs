//! The loop of the node's two writer threads (fragment store, metadata
//! replica): take whatever is queued, up to a bound, and commit it as one
//! batch, so that one fsync serves every writer waiting at that moment.

use tokio::sync::mpsc;

/// Runs until every sender is gone: each batch is the next job and those
/// queued behind it until their `weight` reaches `max_weight`.
pub(crate) fn run<J>(
    mut jobs: mpsc::Receiver<J>,
    max_weight: u64,
    weight: impl Fn(&J) -> u64,
    mut commit: impl FnMut(Vec<J>),
) {
    while let Some(first) = jobs.blocking_recv() {
        let mut total = weight(&first);
        let mut batch = vec![first];
        while total < max_weight {
            match jobs.try_recv() {
                Ok(next) => {
                    total += weight(&next);
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        commit(batch);
    }
}
