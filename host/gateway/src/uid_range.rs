//! Which host uids sandboxes map to, chosen so no local user can reach them.
//!
//! Every sandbox gets 65536 host ids from `base + slot * 65536`, for
//! [`UID_SLOTS`] slots. The first regular user `useradd` creates is handed
//! the subordinate ids 100000..165535 in `/etc/subuid` and `/etc/subgid`,
//! and with `newuidmap` can map them into a namespace of its own: a base
//! there would let that user own sandbox files. New state dirs use a base
//! above anything `useradd` hands out (its SUB_UID_MAX is 600100000); a
//! state dir from before keeps its base (its files are owned by it), and
//! every start refuses a base that overlaps a subordinate range.

use std::path::Path;

use openshell_core::uid_slot::UID_SLOTS;

/// Ids per sandbox.
pub const IDS_PER_SLOT: u64 = 65_536;
/// The base new state dirs use: 2^31, so the whole table
/// (2^31 .. 2^31 + 2^30) stays below the largest valid uid.
pub const DEFAULT_BASE: u32 = 1 << 31;
/// What state dirs made before the base was recorded used.
pub const LEGACY_BASE: u32 = 100_000;
/// Where a state dir records its base.
const BASE_FILE: &str = "uid-base";

/// The host ids the whole sandbox table can use, from `base`.
pub fn span(base: u32) -> std::ops::Range<u64> {
    let start = u64::from(base);
    start..start + u64::from(UID_SLOTS) * IDS_PER_SLOT
}

/// One line of `/etc/subuid` or `/etc/subgid`: `name:start:count`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubordinateRange {
    pub owner: String,
    pub ids: std::ops::Range<u64>,
}

/// The ranges in a subordinate-id file's text; malformed lines are skipped
/// (shadow-utils skips them too).
pub fn parse_subordinate(text: &str) -> Vec<SubordinateRange> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut f = l.trim().split(':');
            let (owner, start, count) = (f.next()?, f.next()?, f.next()?);
            let (start, count): (u64, u64) = (start.parse().ok()?, count.parse().ok()?);
            Some(SubordinateRange {
                owner: owner.to_owned(),
                ids: start..start.saturating_add(count),
            })
        })
        .collect()
}

/// The first subordinate range that overlaps the sandboxes' ids.
pub fn first_overlap(base: u32, ranges: &[SubordinateRange]) -> Option<&SubordinateRange> {
    let ours = span(base);
    ranges
        .iter()
        .find(|r| r.ids.start < ours.end && ours.start < r.ids.end)
}

#[derive(Debug, thiserror::Error)]
pub enum UidRangeError {
    #[error(
        "sandbox uids {}..{} overlap {file}'s range for {} ({}..{}): that user could map sandbox ids with newuidmap. Pass --uid-base outside every subordinate range, or move that entry",
        span(*.base).start, span(*.base).end, .range.owner, .range.ids.start, .range.ids.end
    )]
    Overlap {
        base: u32,
        file: String,
        range: SubordinateRange,
    },
    #[error("uid base {base} leaves no room for {UID_SLOTS} sandboxes of 65536 ids below 2^32")]
    TooHigh { base: u32 },
    #[error("cannot read or record the uid base in {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The base for `state_dir`: the one given, else the one it recorded, else
/// [`LEGACY_BASE`] for a state dir that already holds sandboxes, else
/// [`DEFAULT_BASE`]. What is chosen is recorded.
pub fn resolve(state_dir: &Path, given: Option<u32>) -> Result<u32, UidRangeError> {
    let file = state_dir.join(BASE_FILE);
    let io = |source| UidRangeError::Io {
        path: file.clone(),
        source,
    };
    let recorded = match std::fs::read_to_string(&file) {
        Ok(t) => t.trim().parse::<u32>().ok(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(e)),
    };
    let base = given.or(recorded).unwrap_or_else(|| {
        if state_dir.join("sandboxes").exists() {
            LEGACY_BASE
        } else {
            DEFAULT_BASE
        }
    });
    if span(base).end > u64::from(u32::MAX) {
        return Err(UidRangeError::TooHigh { base });
    }
    if recorded != Some(base) {
        openshell_plugin::write_private(&file, base.to_string().as_bytes()).map_err(io)?;
    }
    Ok(base)
}

/// Refuses `base` if any of `files` (normally `/etc/subuid` and
/// `/etc/subgid`) gives a user ids inside the sandboxes' span. A missing
/// file gives nobody anything.
pub fn check_subordinate(base: u32, files: &[&Path]) -> Result<(), UidRangeError> {
    for f in files {
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(UidRangeError::Io {
                    path: f.to_path_buf(),
                    source,
                });
            }
        };
        if let Some(r) = first_overlap(base, &parse_subordinate(&text)) {
            return Err(UidRangeError::Overlap {
                base,
                file: f.display().to_string(),
                range: r.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_useradd_range_collides_with_the_legacy_base_and_not_the_default() {
        let ranges =
            parse_subordinate("# comment\nalice:100000:65536\nbob:165536:65536\nbad line\n");
        assert_eq!(ranges.len(), 2);
        assert_eq!(first_overlap(LEGACY_BASE, &ranges).unwrap().owner, "alice");
        assert_eq!(first_overlap(DEFAULT_BASE, &ranges), None);
        // useradd's SUB_UID_MAX default is 600100000.
        let top = parse_subordinate("last:600034464:65536");
        assert_eq!(first_overlap(DEFAULT_BASE, &top), None);
        assert!(span(DEFAULT_BASE).end <= u64::from(u32::MAX));
    }

    #[test]
    fn a_new_state_dir_gets_the_default_base_and_an_old_one_keeps_its_own() {
        let fresh = tempfile::tempdir().unwrap();
        assert_eq!(resolve(fresh.path(), None).unwrap(), DEFAULT_BASE);
        assert_eq!(
            resolve(fresh.path(), None).unwrap(),
            DEFAULT_BASE,
            "recorded"
        );

        let old = tempfile::tempdir().unwrap();
        std::fs::create_dir(old.path().join("sandboxes")).unwrap();
        assert_eq!(resolve(old.path(), None).unwrap(), LEGACY_BASE);

        let given = tempfile::tempdir().unwrap();
        assert_eq!(resolve(given.path(), Some(1 << 30)).unwrap(), 1 << 30);
        assert!(matches!(
            resolve(given.path(), Some(u32::MAX - 10)),
            Err(UidRangeError::TooHigh { .. })
        ));
    }

    #[test]
    fn a_start_refuses_a_base_a_local_user_can_map() {
        let dir = tempfile::tempdir().unwrap();
        let subuid = dir.path().join("subuid");
        std::fs::write(&subuid, "alice:100000:65536\n").unwrap();
        let missing = dir.path().join("subgid");
        let err = check_subordinate(LEGACY_BASE, &[&subuid, &missing]).unwrap_err();
        assert!(err.to_string().contains("alice"), "{err}");
        assert!(err.to_string().contains("--uid-base"), "{err}");
        check_subordinate(DEFAULT_BASE, &[&subuid, &missing]).unwrap();
    }
}
