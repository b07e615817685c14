//! Locks and permanent deletes of one object version, decided by the
//! version's compare-and-set register (spec/metadata.md, "Locks and
//! permanent deletes"): a delete and a new lock that race are put in one
//! order, and whichever comes second is refused. The decision is then
//! written to the version's row, where the CRDT merge keeps it.

use cairn_protocol::guard::{GuardChange, GuardRefusal, VersionGuard};
use cairn_protocol::meta::{RowKey, RowValue, Table};
use cairn_protocol::metarpc::RegisterKey;
use cairn_protocol::version::ObjectVersion;
use thiserror::Error;

use cairn_node::clock::now_unix_ms;
use cairn_node::meta::{MetaError, Metadata};

#[derive(Debug, Error)]
pub enum LockError {
    #[error("no such version")]
    NoSuchVersion,
    #[error(transparent)]
    Refused(#[from] GuardRefusal),
    #[error("the version's lock register is unreadable: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Meta(#[from] MetaError),
}

/// Decides `change` to the version at `key` (a row of the versions
/// table) in its lock guard, if its lock state allows: the answer is the
/// row as read and the guard decided. The row is not written; a refusal
/// of a purge decided earlier is `Purged`.
pub async fn decide_version_change(
    metadata: &Metadata,
    key: &RowKey,
    change: GuardChange,
) -> Result<(ObjectVersion, VersionGuard), LockError> {
    if key.table != Table::Versions {
        return Err(LockError::NoSuchVersion);
    }
    let Some(RowValue::Version(row)) = metadata.read(vec![key.clone()]).await?.remove(0) else {
        return Err(LockError::NoSuchVersion);
    };
    let register = RegisterKey {
        partition: key.partition.clone(),
        // Version sort keys hold a zero byte, which object keys (the
        // names of conditional-write registers) never do.
        name: key.sort.clone(),
    };
    let now = now_unix_ms();
    let decided = metadata
        .compare_and_set(register, |current| {
            let guard = match current {
                None => VersionGuard::of(&row),
                Some(bytes) => VersionGuard::decode(bytes)
                    .map_err(|e| LockError::Corrupt(e.to_string()))?
                    .join(&row),
            };
            Ok::<_, LockError>(Some(guard.apply(change, now)?.encode()))
        })
        .await??;
    let guard = match decided {
        Some(bytes) => {
            VersionGuard::decode(&bytes).map_err(|e| LockError::Corrupt(e.to_string()))?
        }
        None => return Err(LockError::Corrupt("empty guard".into())),
    };
    Ok((*row, guard))
}

/// Applies `change` to the version at `key` (a row of the versions
/// table) if its lock state allows, and returns the new state.
pub async fn change_version_lock(
    metadata: &Metadata,
    key: &RowKey,
    change: GuardChange,
) -> Result<VersionGuard, LockError> {
    let (mut written, guard) = match decide_version_change(metadata, key, change).await {
        Ok(decided) => decided,
        Err(LockError::Refused(GuardRefusal::Purged)) => {
            // A purge was decided but perhaps never reached the row (its
            // coordinator stopped): finish it before answering.
            if let Some(RowValue::Version(row)) = metadata.read(vec![key.clone()]).await?.remove(0)
                && row.purged.is_none()
            {
                let mut written = *row;
                written.purged = Some(metadata.timestamp());
                metadata
                    .write(vec![(key.clone(), RowValue::Version(Box::new(written)))])
                    .await?;
            }
            return Err(GuardRefusal::Purged.into());
        }
        Err(error) => return Err(error),
    };
    written.retention = guard.retention;
    written.legal_hold = guard.legal_hold;
    if guard.purged && written.purged.is_none() {
        written.purged = Some(metadata.timestamp());
    }
    metadata
        .write(vec![(key.clone(), RowValue::Version(Box::new(written)))])
        .await?;
    Ok(guard)
}
