//! Ordered object listings over the versions table (spec/metadata.md,
//! "Listing"): what ListObjects (V1 and V2) and ListObjectVersions need —
//! prefix, delimiter with common prefixes, a start point, and a bounded
//! page with the point to continue from. Pages come from quorum range
//! reads, so a listing sees every write acknowledged before it began.

#[cfg(test)]
use cairn_protocol::ids::VersionId;
use cairn_protocol::meta::{
    Partition, RowValue, Table, prefix_end, version_of_sort_key, version_sort_key,
};
use cairn_protocol::metarpc::MAX_ITEMS;
use cairn_protocol::version::{ObjectVersion, VersionBody};

use cairn_node::clock::now_unix_ms;
use cairn_node::meta::{MetaError, Metadata};

use crate::heads::VersionRef;

/// Entries in one listing page at most: what one metadata page carries
/// (S3's own cap of 1000 is the gateway's to apply).
pub const MAX_PAGE_ENTRIES: usize = MAX_ITEMS;

/// Where a listing starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListStart {
    /// From the first key.
    Beginning,
    /// After every version of this key (start-after, marker, key-marker).
    AfterKey(String),
    /// After this version of this key, in the key's newest-first order
    /// (key-marker with version-id-marker; ListObjectVersions only). An
    /// id names the version with that internal id, null or not, so that
    /// a page can resume after a null version exactly; `null` names the
    /// newest null version.
    AfterVersion(String, VersionRef),
    /// From a point a previous page handed out (continuation token).
    Resume(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListRequest {
    pub prefix: String,
    pub delimiter: Option<String>,
    pub start: ListStart,
    /// 1 to [`MAX_PAGE_ENTRIES`] (0 is answered with an empty, truncated
    /// page by S3; the gateway decides that case).
    pub max_keys: usize,
}

/// One page: entries and common prefixes in key order, counted together
/// against `max_keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    pub entries: Vec<ObjectVersion>,
    /// For ListObjectVersions, whether each entry is its key's latest
    /// version (S3's IsLatest); for ListObjects every entry is.
    pub is_latest: Vec<bool>,
    pub common_prefixes: Vec<String>,
    /// Where the next page starts, when the listing is truncated.
    pub resume: Option<Vec<u8>>,
}

impl ListPage {
    pub fn empty() -> Self {
        Self {
            entries: Vec::new(),
            is_latest: Vec::new(),
            common_prefixes: Vec::new(),
            resume: None,
        }
    }
}

/// The current version of every key (ListObjects): a key's latest
/// version is its existing version with the highest head sequence, and
/// keys whose latest version is a delete marker are left out.
pub async fn list_objects(
    metadata: &Metadata,
    bucket: &str,
    request: &ListRequest,
) -> Result<ListPage, MetaError> {
    list(metadata, bucket, request, false).await
}

/// Every existing version, newest first (by head sequence) within a key,
/// delete markers included (ListObjectVersions).
pub async fn list_versions(
    metadata: &Metadata,
    bucket: &str,
    request: &ListRequest,
) -> Result<ListPage, MetaError> {
    list(metadata, bucket, request, true).await
}

async fn list(
    metadata: &Metadata,
    bucket: &str,
    request: &ListRequest,
    all_versions: bool,
) -> Result<ListPage, MetaError> {
    let partition = Partition::bucket(bucket);
    let max_keys = request.max_keys.clamp(1, MAX_PAGE_ENTRIES);
    let prefix = request.prefix.as_bytes();
    let end = prefix_end(prefix);
    let mut cursor = match &request.start {
        ListStart::Beginning => prefix.to_vec(),
        ListStart::AfterKey(key) => after_key(key),
        // The key's versions are read whole: their order is by sequence.
        ListStart::AfterVersion(key, _) => {
            let mut sort = key.as_bytes().to_vec();
            sort.push(0);
            sort
        }
        ListStart::Resume(point) => point.clone(),
    };
    if cursor.as_slice() < prefix {
        cursor = prefix.to_vec();
    }
    let now = now_unix_ms();
    let mut page = ListPage::empty();
    // A key is decided once all its rows are seen: the existing row with
    // the highest head sequence is its latest version.
    let mut group: Option<KeyGroup> = None;
    loop {
        let rows = metadata
            .range(
                &partition,
                Table::Versions,
                &cursor,
                end.as_deref(),
                MAX_ITEMS.min(4 * max_keys),
            )
            .await?;
        let mut jumped = false;
        for (sort, value) in &rows.rows {
            let (Some((key, _)), RowValue::Version(version)) = (version_of_sort_key(sort), value)
            else {
                continue;
            };
            match &mut group {
                Some(current) if current.key == key => current.consider(version, now),
                _ => {
                    if let Some(done) = group.take()
                        && let Some(step) = page.decide(request, done, all_versions, now, max_keys)
                    {
                        match step {
                            Step::Full | Step::End => return Ok(page),
                            Step::Jump(next) => {
                                cursor = next;
                                jumped = true;
                                break;
                            }
                        }
                    }
                    let mut new = KeyGroup::new(key, sort, all_versions);
                    new.consider(version, now);
                    group = Some(new);
                }
            }
        }
        if jumped {
            continue;
        }
        match rows.rows.last() {
            Some((last, _)) if rows.more => {
                cursor = last.clone();
                cursor.push(0);
            }
            _ => {
                if let Some(done) = group.take() {
                    // A jump past the end of the listing ends it too.
                    page.decide(request, done, all_versions, now, max_keys);
                }
                return Ok(page);
            }
        }
    }
}

/// The rows of one key seen so far.
struct KeyGroup {
    key: String,
    /// Where the key's rows start: a page that ends before the key
    /// resumes here.
    first_sort: Vec<u8>,
    /// The existing row with the highest head sequence.
    latest: Option<ObjectVersion>,
    /// Every row, existing or not (a version-id-marker may name one gone
    /// since), when all versions are listed.
    all: Option<Vec<ObjectVersion>>,
}

impl KeyGroup {
    fn new(key: &str, sort: &[u8], all_versions: bool) -> Self {
        Self {
            key: key.to_owned(),
            first_sort: sort.to_vec(),
            latest: None,
            all: all_versions.then(Vec::new),
        }
    }

    fn consider(&mut self, version: &ObjectVersion, now: u64) {
        if let Some(all) = &mut self.all {
            all.push(version.clone());
        }
        if version.exists(now) && self.latest.as_ref().is_none_or(|l| version.seq > l.seq) {
            self.latest = Some(version.clone());
        }
    }
}

/// What adding an entry did to a page.
enum Step {
    /// The page is full; it resumes where the entry that did not fit is.
    Full,
    /// A common prefix was added: continue the listing from here.
    Jump(Vec<u8>),
    /// A common prefix was added after which no key can sort.
    End,
}

impl ListPage {
    /// Adds what `group` lists: its latest version if that is an object
    /// (ListObjects), or every version newest first (ListObjectVersions),
    /// after the version the request starts after.
    fn decide(
        &mut self,
        request: &ListRequest,
        group: KeyGroup,
        all_versions: bool,
        now: u64,
        max_keys: usize,
    ) -> Option<Step> {
        let latest = group.latest?;
        if !all_versions {
            if latest.body == VersionBody::DeleteMarker {
                return None;
            }
            return self.offer(request, &group.first_sort, &latest, true, max_keys);
        }
        let mut all = group.all.unwrap_or_default();
        all.sort_by(|a, b| b.seq.cmp(&a.seq).then(b.version.cmp(&a.version)));
        // Rows purged since the marker was handed out still hold their
        // place; only rows compacted away since fall back to id order.
        let skip = match &request.start {
            ListStart::AfterVersion(key, marker) if *key == group.key => {
                let at = match marker {
                    VersionRef::Id(id) => all.iter().position(|v| v.version == *id),
                    VersionRef::Null => all.iter().position(|v| v.null),
                };
                match (at, marker) {
                    (Some(at), _) => at + 1,
                    (None, VersionRef::Id(id)) => all
                        .iter()
                        .position(|v| v.version < *id)
                        .unwrap_or(all.len()),
                    (None, VersionRef::Null) => 0,
                }
            }
            _ => 0,
        };
        for version in all.iter().skip(skip).filter(|v| v.exists(now)) {
            let sort = version_sort_key(&version.key, &version.version);
            let is_latest = version.version == latest.version;
            if let Some(step) = self.offer(request, &sort, version, is_latest, max_keys) {
                return Some(step);
            }
        }
        None
    }

    /// Adds `version` (found at `sort`) as an entry or as its common
    /// prefix; `None` when the listing simply goes on.
    fn offer(
        &mut self,
        request: &ListRequest,
        sort: &[u8],
        version: &ObjectVersion,
        is_latest: bool,
        max_keys: usize,
    ) -> Option<Step> {
        let common = common_prefix(&request.prefix, request.delimiter.as_deref(), &version.key);
        if self.common_prefixes.last().map(String::as_str) == common && common.is_some() {
            return None;
        }
        if self.entries.len() + self.common_prefixes.len() == max_keys {
            self.resume = Some(sort.to_vec());
            return Some(Step::Full);
        }
        match common {
            Some(common) => {
                self.common_prefixes.push(common.to_owned());
                // Skip every key under the common prefix in one step.
                match prefix_end(common.as_bytes()) {
                    Some(next) => Some(Step::Jump(next)),
                    None => Some(Step::End),
                }
            }
            None => {
                self.entries.push(version.clone());
                self.is_latest.push(is_latest);
                None
            }
        }
    }
}

/// The first sort key after every version of `key`.
fn after_key(key: &str) -> Vec<u8> {
    let mut sort = key.as_bytes().to_vec();
    sort.push(1);
    sort
}

/// The common prefix `key` rolls up into: the prefix and the key's text up
/// to and including the first delimiter after it.
fn common_prefix<'k>(prefix: &str, delimiter: Option<&str>, key: &'k str) -> Option<&'k str> {
    let delimiter = delimiter.filter(|d| !d.is_empty())?;
    let rest = key.get(prefix.len()..)?;
    let at = rest.find(delimiter)?;
    Some(&key[..prefix.len() + at + delimiter.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefixes_stop_at_the_first_delimiter_after_the_prefix() {
        assert_eq!(common_prefix("", Some("/"), "a/b/c"), Some("a/"));
        assert_eq!(common_prefix("a/", Some("/"), "a/b/c"), Some("a/b/"));
        assert_eq!(common_prefix("a/", Some("/"), "a/c"), None);
        assert_eq!(common_prefix("", None, "a/b"), None);
        assert_eq!(common_prefix("", Some(""), "a/b"), None);
        assert_eq!(common_prefix("x", Some("--"), "x1--2--3"), Some("x1--"));
    }

    #[test]
    fn after_key_sorts_past_every_version_of_the_key_and_before_longer_keys() {
        let v = VersionId::new(u64::MAX, [0xff; 10]);
        assert!(after_key("a") > version_sort_key("a", &VersionId::new(0, [0; 10])));
        assert!(after_key("a") > version_sort_key("a", &v));
        assert!(after_key("a") < version_sort_key("a\u{2}", &v));
        assert!(after_key("a") < version_sort_key("a/", &v));
    }
}
