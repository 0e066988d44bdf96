//! Host uid slots: which 65536-uid range on the host a sandbox's user
//! namespace maps to. The gateway allocates one per sandbox at create and
//! stores it; these are the pure rules it allocates by.

use std::collections::HashSet;

use crate::SandboxId;

/// How many uid ranges sandboxes are spread over.
pub const UID_SLOTS: u32 = 16_384;

/// Where a sandbox's search for a free slot starts: stable for an id, and
/// the slot records from before slots were stored were given, so a
/// backfilled sandbox keeps owning the files in its workdir.
pub fn preferred(id: SandboxId) -> u32 {
    // FNV-1a over the id's text: tiny, and stable across Rust versions
    // (unlike DefaultHasher).
    let h = id
        .to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    (h % u64::from(UID_SLOTS)) as u32
}

/// The slots to try for `id`, preferred first, skipping those in use; each
/// slot appears once.
pub fn candidates(id: SandboxId, in_use: &HashSet<u32>) -> impl Iterator<Item = u32> + '_ {
    let start = preferred(id);
    (0..UID_SLOTS)
        .map(move |i| (start + i) % UID_SLOTS)
        .filter(move |s| !in_use.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_preferred_slot_is_stable_for_an_id() {
        // The value the gateway's old in-memory allocation derived; a
        // migrated sandbox must land on the same range.
        let id = SandboxId(uuid::Uuid::parse_str("6b3f1c5e-0d4a-4f1e-9c2b-7a8d9e0f1a2b").unwrap());
        assert_eq!(preferred(id), preferred(id));
        assert!(preferred(id) < UID_SLOTS);
    }

    #[test]
    fn a_full_table_has_no_candidates() {
        let all: HashSet<u32> = (0..UID_SLOTS).collect();
        assert_eq!(candidates(SandboxId::new(), &all).next(), None);
    }

    proptest! {
        #[test]
        fn candidates_start_at_the_preferred_slot_and_skip_used_ones(
            used in proptest::collection::hash_set(0..UID_SLOTS, 0..64)
        ) {
            let id = SandboxId::new();
            let c: Vec<u32> = candidates(id, &used).collect();
            prop_assert_eq!(c.len(), (UID_SLOTS as usize) - used.len());
            prop_assert!(c.iter().all(|s| !used.contains(s) && *s < UID_SLOTS));
            if !used.contains(&preferred(id)) {
                prop_assert_eq!(c[0], preferred(id));
            }
        }
    }
}
