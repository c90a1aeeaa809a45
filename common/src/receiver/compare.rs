//! The checksum-resync comparison, as plain functions (no I/O, no session):
//! given the agent's hashes and the replica's block hashes, which regions and
//! which blocks differ. `answer_resync` looks the replica's hashes up in the
//! sink and turns these answers into frames.

use anyhow::{bail, Result};

use crate::resync::{self, BlockHash, HashScheme, WIRE_BLOCK_HASH_LEN};

/// The regions among `first_region..` (the agent's `theirs`, one 16-byte hash
/// each) whose hash over the replica's block hashes `mine` under `scheme`
/// differs. `mine` holds the blocks of exactly those regions of a disk of
/// `size` bytes, in order.
pub fn differing_regions(
    size: u64,
    first_region: u64,
    theirs: &[BlockHash],
    mine: &[BlockHash],
    scheme: HashScheme,
) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    let mut at = 0usize;
    for (j, t) in theirs.iter().enumerate() {
        let region = first_region + j as u64;
        let n = resync::blocks_in_region(size, region) as usize;
        let Some(ours) = mine.get(at..at + n) else {
            bail!(
                "the replica's block hashes hold {} blocks, the regions need more",
                mine.len()
            );
        };
        at += n;
        if scheme.region(ours) != *t {
            out.push(region);
        }
    }
    Ok(out)
}

/// The blocks of one region (indexes in it) whose wire hash in `theirs`
/// differs from the replica's `mine`. Both list the region's blocks.
pub fn differing_blocks(
    theirs: &[[u8; WIRE_BLOCK_HASH_LEN]],
    mine: &[BlockHash],
) -> Result<Vec<u8>> {
    if theirs.len() != mine.len() || theirs.len() > resync::REGION_BLOCKS as usize {
        bail!(
            "{} block hashes from the agent, {} in the replica",
            theirs.len(),
            mine.len()
        );
    }
    Ok(mine
        .iter()
        .zip(theirs)
        .enumerate()
        .filter(|(_, (m, t))| resync::wire_block_hash(m) != **t)
        .map(|(i, _)| i as u8)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resync::{BLOCK, REGION, REGION_BLOCKS, UNKNOWN_HASH};

    const S: HashScheme = HashScheme::CURRENT;

    fn blocks(n: usize, seed: u8) -> Vec<BlockHash> {
        (0..n)
            .map(|i| S.block(&vec![seed.wrapping_add(i as u8); BLOCK as usize]))
            .collect()
    }

    #[test]
    fn equal_regions_match_and_a_changed_or_unknown_block_differs() {
        // Two whole regions and a last region of 3 blocks.
        let size = 2 * REGION + 3 * BLOCK;
        let mine = blocks(2 * REGION_BLOCKS as usize + 3, 1);
        let theirs_of = |m: &[BlockHash]| {
            vec![
                S.region(&m[..256]),
                S.region(&m[256..512]),
                S.region(&m[512..]),
            ]
        };
        assert!(differing_regions(size, 0, &theirs_of(&mine), &mine, S)
            .unwrap()
            .is_empty());
        let mut changed = mine.clone();
        changed[513] = S.block(&[9; BLOCK as usize]);
        assert_eq!(
            differing_regions(size, 0, &theirs_of(&changed), &mine, S).unwrap(),
            vec![2]
        );
        // A replica block whose hash is unknown differs from any content.
        let mut unknown = mine.clone();
        unknown[7] = UNKNOWN_HASH;
        assert_eq!(
            differing_regions(size, 0, &theirs_of(&mine), &unknown, S).unwrap(),
            vec![0]
        );
        // Too few replica hashes is an error, never a silent "equal".
        assert!(differing_regions(size, 0, &theirs_of(&mine), &mine[..300], S).is_err());
    }

    #[test]
    fn differing_blocks_names_exactly_the_changed_blocks() {
        let mine = blocks(256, 3);
        let mut theirs: Vec<_> = mine.iter().map(resync::wire_block_hash).collect();
        theirs[0] = [0; WIRE_BLOCK_HASH_LEN];
        theirs[255] = [1; WIRE_BLOCK_HASH_LEN];
        assert_eq!(differing_blocks(&theirs, &mine).unwrap(), vec![0, 255]);
        assert!(differing_blocks(&theirs[..10], &mine).is_err());
    }
}
