//! Sending only what differs inside a block (resync and failback).
//!
//! The comparison is hierarchical: both sides first compare one plain BLAKE3 per block (from the
//! block map, or computed by the host), and only for a block that differs do they compare *fine
//! hashes*: BLAKE3 of each 4 KiB piece, truncated to 16 bytes (a random collision is 2^-128 per
//! piece; the whole block's 32-byte hash is checked again after patching, so a collision could
//! only ever cost a retry, never a wrong block). The differing pieces, coalesced into ranges,
//! travel as a *patch*:
//!
//! ```text
//! repeated: op u8 (0 = data follows, 1 = zeros) | offset u32 LE | length u32 LE | [data]
//! ```
//!
//! Offsets are within the block; ranges must lie inside it and come in increasing, non-overlapping
//! order (so a patch can never write a byte twice). A range of zeros costs 9 bytes on the wire.

use crate::chunk::digest::is_zero;

/// Granularity of the fine comparison.
pub const FINE: usize = crate::file_formats::PATCH_FINE;
/// Bytes of one fine hash.
pub const FINE_HASH_LEN: usize = crate::file_formats::PATCH_FINE_HASH_LEN;
use crate::file_formats::{
    PATCH_OP_DATA as OP_DATA, PATCH_OP_ZERO as OP_ZERO, PATCH_RECORD_HEADER as RECORD_HEADER,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatchError {
    #[error("patch record at byte {at} is cut off")]
    Truncated { at: usize },
    #[error("patch record at byte {at} has unknown operation {op}")]
    UnknownOp { at: usize, op: u8 },
    #[error("patch range {offset}+{len} is outside the {block_len}-byte block")]
    OutOfBlock {
        offset: u32,
        len: u32,
        block_len: usize,
    },
    #[error(
        "patch range at {offset} overlaps or precedes the previous range (ends at {prev_end})"
    )]
    Unordered { offset: u32, prev_end: u64 },
    #[error("patch range at {offset} is empty")]
    Empty { offset: u32 },
}

/// The longest patch a block can need: every piece its own data record.
pub fn max_patch_len(block_len: usize) -> usize {
    block_len + block_len.div_ceil(FINE) * RECORD_HEADER
}

/// Fine hashes of a block: `FINE_HASH_LEN` bytes per `FINE`-byte piece (the last may be short).
pub fn fine_hashes(block: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(block.len().div_ceil(FINE) * FINE_HASH_LEN);
    for piece in block.chunks(FINE) {
        out.extend_from_slice(&blake3::hash(piece).as_bytes()[..FINE_HASH_LEN]);
    }
    out
}

/// Byte ranges `(offset, len)` of `block` whose fine hashes differ from `other_fine` (the other
/// side's fine hashes of the same block), adjacent pieces coalesced. A missing or short
/// `other_fine` counts as different.
pub fn differing_ranges(block: &[u8], other_fine: &[u8]) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for (i, piece) in block.chunks(FINE).enumerate() {
        let theirs = other_fine.get(i * FINE_HASH_LEN..(i + 1) * FINE_HASH_LEN);
        let same = theirs == Some(&blake3::hash(piece).as_bytes()[..FINE_HASH_LEN]);
        if same {
            continue;
        }
        let off = (i * FINE) as u32;
        let len = piece.len() as u32;
        match out.last_mut() {
            Some((o, l)) if *o + *l == off => *l += len,
            _ => out.push((off, len)),
        }
    }
    out
}

/// The patch that turns the other side's block into `block` over `ranges`.
pub fn encode(block: &[u8], ranges: &[(u32, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(off, len) in ranges {
        let data = &block[off as usize..off as usize + len as usize];
        let zero = is_zero(data);
        out.push(if zero { OP_ZERO } else { OP_DATA });
        out.extend_from_slice(&off.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        if !zero {
            out.extend_from_slice(data);
        }
    }
    out
}

/// Applies a patch to `block` in place. Validates the whole patch before writing a byte, so a
/// bad patch leaves the block as it was.
pub fn apply(block: &mut [u8], patch: &[u8]) -> Result<usize, PatchError> {
    let records = parse(patch, block.len())?;
    for r in &records {
        let dst = &mut block[r.offset as usize..r.offset as usize + r.len as usize];
        match r.data {
            Some((s, e)) => dst.copy_from_slice(&patch[s..e]),
            None => dst.fill(0),
        }
    }
    Ok(records.len())
}

struct Record {
    offset: u32,
    len: u32,
    /// Position of the data in the patch; `None` for zeros.
    data: Option<(usize, usize)>,
}

fn parse(patch: &[u8], block_len: usize) -> Result<Vec<Record>, PatchError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let mut prev_end = 0u64;
    while at < patch.len() {
        let head = patch
            .get(at..at + RECORD_HEADER)
            .ok_or(PatchError::Truncated { at })?;
        let op = head[0];
        let offset = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        let len = u32::from_le_bytes([head[5], head[6], head[7], head[8]]);
        if len == 0 {
            return Err(PatchError::Empty { offset });
        }
        let end = offset as u64 + len as u64;
        if end > block_len as u64 {
            return Err(PatchError::OutOfBlock {
                offset,
                len,
                block_len,
            });
        }
        if (offset as u64) < prev_end {
            return Err(PatchError::Unordered { offset, prev_end });
        }
        prev_end = end;
        let body = at + RECORD_HEADER;
        let data = match op {
            OP_ZERO => {
                at = body;
                None
            }
            OP_DATA => {
                let stop = body
                    .checked_add(len as usize)
                    .filter(|&s| s <= patch.len())
                    .ok_or(PatchError::Truncated { at })?;
                at = stop;
                Some((body, stop))
            }
            op => return Err(PatchError::UnknownOp { at, op }),
        };
        out.push(Record { offset, len, data });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn a_patch_from_fine_hashes_rebuilds_the_new_block_and_sends_only_changed_pieces() {
        let old = block(1, 1 << 20);
        let mut new = old.clone();
        new[5000..5010].fill(9); // inside piece 1
        new[8192..12288].fill(0); // piece 2 becomes zeros
        new[(1 << 20) - 1] ^= 1; // last piece
        let ranges = differing_ranges(&new, &fine_hashes(&old));
        assert_eq!(ranges, vec![(4096, 8192), ((1 << 20) - 4096, 4096)]);
        let p = encode(&new, &ranges);
        // Piece 1 (data) and 2 (not all zero: coalesced with 1) plus the last piece.
        assert!(p.len() < 3 * FINE + 3 * RECORD_HEADER, "{}", p.len());
        let mut rebuilt = old.clone();
        apply(&mut rebuilt, &p).unwrap();
        assert_eq!(rebuilt, new);
    }

    #[test]
    fn zero_ranges_cost_no_data_and_short_last_pieces_work() {
        let old = block(2, 3 * FINE + 100);
        let mut new = old.clone();
        new[3 * FINE..].fill(0);
        let ranges = differing_ranges(&new, &fine_hashes(&old));
        assert_eq!(ranges, vec![(3 * FINE as u32, 100)]);
        let p = encode(&new, &ranges);
        assert_eq!(p.len(), RECORD_HEADER);
        let mut rebuilt = old;
        apply(&mut rebuilt, &p).unwrap();
        assert_eq!(rebuilt, new);
        // Missing fine hashes: everything differs.
        assert_eq!(differing_ranges(&new, &[]), vec![(0, new.len() as u32)]);
    }

    #[test]
    fn bad_patches_are_refused_and_leave_the_block_unchanged() {
        let orig = block(3, 8192);
        let rec = |op: u8, off: u32, len: u32, data: &[u8]| {
            let mut v = vec![op];
            v.extend_from_slice(&off.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
            v.extend_from_slice(data);
            v
        };
        let good = rec(0, 0, 4, &[1, 2, 3, 4]);
        let cases: Vec<(Vec<u8>, PatchError)> = vec![
            (good[..5].to_vec(), PatchError::Truncated { at: 0 }),
            (rec(0, 0, 8, &[1; 4]), PatchError::Truncated { at: 0 }),
            (rec(7, 0, 1, &[]), PatchError::UnknownOp { at: 0, op: 7 }),
            (
                rec(1, 8190, 4, &[]),
                PatchError::OutOfBlock {
                    offset: 8190,
                    len: 4,
                    block_len: 8192,
                },
            ),
            (
                rec(1, u32::MAX, 2, &[]),
                PatchError::OutOfBlock {
                    offset: u32::MAX,
                    len: 2,
                    block_len: 8192,
                },
            ),
            (rec(1, 10, 0, &[]), PatchError::Empty { offset: 10 }),
            (
                [good.clone(), rec(1, 2, 4, &[])].concat(),
                PatchError::Unordered {
                    offset: 2,
                    prev_end: 4,
                },
            ),
            // A valid record followed by a bad one: nothing at all is applied.
            (
                [good.clone(), vec![0, 1]].concat(),
                PatchError::Truncated { at: good.len() },
            ),
        ];
        for (p, want) in cases {
            let mut b = orig.clone();
            assert_eq!(apply(&mut b, &p), Err(want));
            assert_eq!(b, orig);
        }
    }
}
