//! Checksum resync geometry and hashes, shared by the agent (which hashes its
//! disk) and the receivers (which keep a hash per replica block).
//!
//! - block = 4 KiB, the unit that is compared and resent;
//! - block hash = 16 bytes of the block's hash under the session's
//!   [`HashScheme`] (a disk's last, partial block is hashed padded with zeros
//!   to 4 KiB);
//! - region = 1 MiB = 256 blocks; region hash = the same scheme's hash over
//!   the 16-byte hashes of its blocks inside the disk;
//! - a block the receiver never saw written is the all-zero block (a replica
//!   starts as zeros); a block only partly written is [`UNKNOWN_HASH`], which
//!   never matches, so it is always resent.
//!
//! The scheme is XXH3-128 from protocol version 8 on, BLAKE3 (truncated to 16
//! bytes) below. These hashes only detect change: a false match needs a
//! collision with the replica's block, about 2^-64 per block on the wire
//! (below) for data nobody chose to collide. Resistance to someone who does
//! choose is not asked of them: a writer who controls the disk already
//! decides what replicates, and what the replica must prove it holds is the
//! per-point disk checksum (`disksum.rs`, BLAKE3), which every failover and
//! `verify` checks. XXH3-128 hashes a 4 KiB block at several GiB/s on one
//! core, where BLAKE3 on single 4 KiB blocks manages about 0.7 GiB/s (its
//! SIMD wants longer inputs): the resync of an unchanged disk is then bound
//! by the read, not the hash, and the process server's per-write hash table
//! costs little.
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

/// How block and region hashes are computed; a session's protocol version
/// decides ([`HashScheme::for_version`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashScheme {
    /// BLAKE3, truncated to 16 bytes: protocol versions below 8.
    Blake3,
    /// XXH3-128: protocol version 8 on.
    Xxh3,
}

impl HashScheme {
    /// The scheme this build computes where no peer decides (the process
    /// server's hash table).
    pub const CURRENT: HashScheme = HashScheme::Xxh3;

    /// The scheme of a session negotiated at protocol `version`.
    pub fn for_version(version: u16) -> HashScheme {
        if version >= crate::protocol::PROTOCOL_XXH3 {
            HashScheme::Xxh3
        } else {
            HashScheme::Blake3
        }
    }

    /// Hash of one block; shorter input (a disk's last block) is padded with
    /// zeros to [`BLOCK`].
    pub fn block(self, data: &[u8]) -> BlockHash {
        if data.len() as u64 >= BLOCK {
            return self.hash(data);
        }
        let mut padded = [0u8; BLOCK as usize];
        padded[..data.len()].copy_from_slice(data);
        self.hash(&padded)
    }

    /// Hash of the all-zero block.
    pub fn zero_block(self) -> BlockHash {
        static Z: OnceLock<[BlockHash; 2]> = OnceLock::new();
        let z = Z.get_or_init(|| {
            let zeros = [0u8; BLOCK as usize];
            [
                HashScheme::Blake3.hash(&zeros),
                HashScheme::Xxh3.hash(&zeros),
            ]
        });
        z[self as usize]
    }

    /// Hash of a region from its blocks' hashes.
    pub fn region(self, blocks: &[BlockHash]) -> BlockHash {
        self.hash(blocks.as_flattened())
    }

    fn hash(self, data: &[u8]) -> BlockHash {
        match self {
            HashScheme::Blake3 => {
                let mut out = [0u8; HASH_LEN];
                out.copy_from_slice(&blake3::hash(data).as_bytes()[..HASH_LEN]);
                out
            }
            HashScheme::Xxh3 => xxhash_rust::xxh3::xxh3_128(data).to_le_bytes(),
        }
    }
}

/// The blocks of `offset..offset + len` that it covers only in part (at most
/// two: its first and last), whose hash a receiver cannot compute from the
/// entry. A block is whole only when the range holds all 4096 of its bytes,
/// so the disk's short last block is always partial. The agent sends their
/// hashes after the write, the process server marks them pending: both by
/// this rule.
pub fn partial_blocks(offset: u64, len: u64) -> Vec<u64> {
    if len == 0 {
        return Vec::new();
    }
    let end = offset.saturating_add(len);
    let (head, tail) = (offset / BLOCK, (end - 1) / BLOCK);
    let mut out = Vec::new();
    if !offset.is_multiple_of(BLOCK) || (head == tail && !end.is_multiple_of(BLOCK)) {
        out.push(head);
    }
    if !end.is_multiple_of(BLOCK) && tail != head {
        out.push(tail);
    }
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
        for s in [HashScheme::Blake3, HashScheme::Xxh3] {
            assert_eq!(s.block(&[0u8; 100]), s.zero_block());
            assert_ne!(s.block(&[1u8; 4096]), s.zero_block());
            assert_ne!(s.zero_block(), UNKNOWN_HASH);
            // Only the disk's last block is short: padding is to 4 KiB.
            let mut short = [7u8; 4096];
            short[1000..].fill(0);
            assert_eq!(s.block(&short[..1000]), s.block(&short));
        }
    }

    #[test]
    fn partial_blocks_are_the_edges_a_write_does_not_cover_whole() {
        assert_eq!(partial_blocks(0, 4096), Vec::<u64>::new());
        assert_eq!(partial_blocks(4096, 3 * 4096), Vec::<u64>::new());
        assert_eq!(partial_blocks(512, 512), vec![0]);
        assert_eq!(partial_blocks(0, 512), vec![0]);
        assert_eq!(partial_blocks(3584, 512), vec![0]);
        assert_eq!(partial_blocks(3584, 1024), vec![0, 1]);
        assert_eq!(partial_blocks(4096 + 512, 2 * 4096), vec![1, 3]);
        assert_eq!(partial_blocks(4096, 4096 + 1), vec![2]);
        assert_eq!(partial_blocks(4095, 1), vec![0]);
        assert_eq!(partial_blocks(7, 0), Vec::<u64>::new());
    }

    #[test]
    fn the_schemes_are_the_ones_the_versions_name() {
        // Pinned values: a change of either function would make every peer
        // of another build resend every block.
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        assert_eq!(
            HashScheme::Blake3.block(&data)[..],
            blake3::hash(&data).as_bytes()[..16]
        );
        assert_eq!(
            HashScheme::Xxh3.block(&data),
            xxhash_rust::xxh3::xxh3_128(&data).to_le_bytes()
        );
        assert_ne!(
            HashScheme::Blake3.block(&data),
            HashScheme::Xxh3.block(&data)
        );
        assert_eq!(HashScheme::for_version(7), HashScheme::Blake3);
        assert_eq!(HashScheme::for_version(8), HashScheme::Xxh3);
        assert_eq!(
            HashScheme::for_version(crate::protocol::PROTOCOL_MAX),
            HashScheme::CURRENT
        );
        let blocks = [HashScheme::Xxh3.block(&data), HashScheme::Xxh3.zero_block()];
        let mut flat = Vec::new();
        flat.extend_from_slice(&blocks[0]);
        flat.extend_from_slice(&blocks[1]);
        assert_eq!(
            HashScheme::Xxh3.region(&blocks),
            xxhash_rust::xxh3::xxh3_128(&flat).to_le_bytes()
        );
    }
}
