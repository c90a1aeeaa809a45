//! Checksum resync geometry and hashes, shared by the agent (which hashes its
//! disk) and the receivers (which keep a hash per replica block).
//!
//! - block = 4 KiB, the unit that is compared and resent;
//! - block hash = blake3 of the block truncated to 16 bytes (a disk's last,
//!   partial block is hashed padded with zeros to 4 KiB);
//! - region = 1 MiB = 256 blocks; region hash = blake3 over the 16-byte hashes
//!   of its blocks inside the disk, truncated to 16 bytes;
//! - a block the receiver never saw written is the all-zero block (a replica
//!   starts as zeros); a block only partly written is [`UNKNOWN_HASH`], which
//!   never matches, so it is always resent.
//!
//! On the wire, level 1 carries 16-byte region hashes and level 2 the first
//! [`WIRE_BLOCK_HASH_LEN`] bytes of each block hash: 8 bytes keep level 2 at
//! 0.2 % of the data compared (a false match needs a 64-bit collision with the
//! replica's block: about 2^-64 per block).

use std::sync::OnceLock;

pub const BLOCK: u64 = 4096;
pub const REGION_BLOCKS: u64 = 256;
pub const REGION: u64 = BLOCK * REGION_BLOCKS;
pub const HASH_LEN: usize = 16;
pub const WIRE_BLOCK_HASH_LEN: usize = 8;
/// Stored for a block whose content the receiver cannot know (partial write).
pub const UNKNOWN_HASH: BlockHash = [0xff; HASH_LEN];

pub type BlockHash = [u8; HASH_LEN];

/// Hash of one block; shorter input (a disk's last block) is padded with zeros.
pub fn block_hash(data: &[u8]) -> BlockHash {
    let mut h = blake3::Hasher::new();
    h.update(data);
    if (data.len() as u64) < BLOCK {
        static ZEROS: [u8; BLOCK as usize] = [0; BLOCK as usize];
        h.update(&ZEROS[..BLOCK as usize - data.len()]);
    }
    truncate(h.finalize())
}

/// Hash of the all-zero block.
pub fn zero_block_hash() -> BlockHash {
    static Z: OnceLock<BlockHash> = OnceLock::new();
    *Z.get_or_init(|| block_hash(&[0u8; BLOCK as usize]))
}

/// Hash of a region from its blocks' hashes.
pub fn region_hash(blocks: &[BlockHash]) -> BlockHash {
    let mut h = blake3::Hasher::new();
    for b in blocks {
        h.update(b);
    }
    truncate(h.finalize())
}

fn truncate(h: blake3::Hash) -> BlockHash {
    let mut out = [0u8; HASH_LEN];
    out.copy_from_slice(&h.as_bytes()[..HASH_LEN]);
    out
}

/// Regions of a disk of `size` bytes.
pub fn region_count(size: u64) -> u64 {
    size.div_ceil(REGION)
}

/// Blocks of region `region` inside a disk of `size` bytes (0 past the end).
pub fn blocks_in_region(size: u64, region: u64) -> u64 {
    let start = region.saturating_mul(REGION);
    if start >= size {
        return 0;
    }
    (size - start).div_ceil(BLOCK).min(REGION_BLOCKS)
}

/// The wire form of a block hash (level 2).
pub fn wire_block_hash(h: &BlockHash) -> [u8; WIRE_BLOCK_HASH_LEN] {
    let mut out = [0u8; WIRE_BLOCK_HASH_LEN];
    out.copy_from_slice(&h[..WIRE_BLOCK_HASH_LEN]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_and_padding() {
        assert_eq!(region_count(0), 0);
        assert_eq!(region_count(REGION + 1), 2);
        assert_eq!(blocks_in_region(REGION + 1, 1), 1);
        assert_eq!(blocks_in_region(3 * REGION, 1), 256);
        assert_eq!(blocks_in_region(REGION, 1), 0);
        assert_eq!(block_hash(&[0u8; 100]), zero_block_hash());
        assert_ne!(block_hash(&[1u8; 4096]), zero_block_hash());
        assert_ne!(zero_block_hash(), UNKNOWN_HASH);
    }
}
