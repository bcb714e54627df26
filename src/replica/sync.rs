//! The server's side of the block-sync protocol resync and failback share: the plain hash of
//! every block → 4 KiB fine hashes inside the blocks that differ → the differing ranges → a
//! completion checked against a digest over every block's hash.
//!
//! The direction is the only difference. In a resync the agent's disk is the source: the server
//! shows the replica's side ([`crate::replica::resync`]: the session's staged view) and takes
//! the ranges as a patch per block ([`apply_patch`]). In a failback the server's materialized
//! disk is the source ([`crate::failover::failback`]): the server shows that side and serves the
//! ranges the agent asks for ([`ranges`]). Either way the server's side is a [`SyncSide`], and
//! the steps below are the same code for both.

use std::future::Future;

use bytes::Bytes;
use futures_util::StreamExt;

use crate::chunk::{CpuPool, PlainHash};
use crate::error::{Error, Result};
use crate::replica::patch;

/// Fine-hash requests name at most this many blocks (a 4 MiB block has 16 KiB of fine hashes).
pub const MAX_FINE_BLOCKS: usize = 64;

/// Blocks of one side read at once for one fine-hash request.
const FINE_READS_IN_FLIGHT: usize = 4;

/// The server's side of a sync: a disk of `blocks()` blocks it can read one at a time.
pub trait SyncSide {
    /// The disk's name, for messages.
    fn disk(&self) -> &str;

    /// How many blocks the disk has.
    fn blocks(&self) -> u64;

    /// Block `index` (< `blocks()`) as this side holds it.
    fn read_block(&self, index: u64) -> impl Future<Output = Result<Vec<u8>>> + Send;
}

/// The answer to the hashes step: 32 bytes per block, in block order.
pub fn hashes_body(hashes: impl IntoIterator<Item = PlainHash>) -> Bytes {
    Bytes::from(hashes.into_iter().flat_map(|h| h.0).collect::<Vec<u8>>())
}

/// The fine hashes ([`patch::fine_hashes`]) of the named blocks of `side`, concatenated in the
/// order asked. Checks the request first (size, every index in range): nothing is read for a
/// request that is refused.
pub async fn fine_hashes<S: SyncSide + Sync>(
    side: &S,
    cpu: &CpuPool,
    blocks: &[u64],
) -> Result<Bytes> {
    check_fine_request(blocks)?;
    for &i in blocks {
        check_index(side, i)?;
    }
    // Blocks are read (decrypted, decompressed, or read from a file) and hashed a few at a
    // time: one block at a time left the CPU pool idle while the next was fetched.
    let hashes: Vec<Result<Vec<u8>>> = futures_util::stream::iter(blocks.iter().copied())
        .map(|i| async move {
            let block = side.read_block(i).await?;
            Ok(cpu.run(move || patch::fine_hashes(&block)).await)
        })
        .buffered(FINE_READS_IN_FLIGHT)
        .collect()
        .await;
    let mut out = Vec::new();
    for h in hashes {
        out.extend(h?);
    }
    Ok(Bytes::from(out))
}

/// Refuses a fine-hash request naming too many blocks (checked before anything else is looked
/// up).
pub fn check_fine_request(blocks: &[u64]) -> Result<()> {
    if blocks.len() > MAX_FINE_BLOCKS {
        return Err(Error::invalid(
            "query_too_large",
            format!("at most {MAX_FINE_BLOCKS} blocks per fine-hash request"),
        ));
    }
    Ok(())
}

/// Server to agent: the bytes of the asked ranges of one block, concatenated. Ranges must be
/// non-empty, inside the block and in increasing order.
pub async fn ranges<S: SyncSide>(side: &S, index: u64, asked: &[(u32, u32)]) -> Result<Bytes> {
    check_index(side, index)?;
    let b = side.read_block(index).await?;
    let mut out = Vec::new();
    let mut prev_end = 0u64;
    for &(off, len) in asked {
        let end = off as u64 + len as u64;
        if len == 0 || end > b.len() as u64 || (off as u64) < prev_end {
            return Err(Error::invalid("invalid_range", format!("range {off}+{len} of block {index} is empty, outside the {}-byte block or out of order", b.len())));
        }
        prev_end = end;
        out.extend_from_slice(&b[off as usize..end as usize]);
    }
    Ok(Bytes::from(out))
}

/// Agent to server: applies one block's patch to `block` (this side's copy of it) and checks
/// the result against the agent's hash of the whole block. Returns the new block and its hash.
pub async fn apply_patch(
    cpu: &CpuPool,
    index: u64,
    mut block: Vec<u8>,
    body: Bytes,
    claimed: PlainHash,
) -> Result<(Vec<u8>, PlainHash)> {
    let (block, hash) = cpu
        .run(move || {
            patch::apply(&mut block, &body).map(|_| {
                let h = PlainHash::of(&block);
                (block, h)
            })
        })
        .await
        .map_err(|e| Error::invalid("invalid_patch", format!("block {index}: {e}")))?;
    if !hash.ct_eq(&claimed) {
        return Err(Error::invalid("hash_mismatch", format!("block {index} after the patch hashes to {}, the agent said {}: the patch was made against other content; fetch the hashes again", hash.to_hex(), claimed.to_hex())));
    }
    Ok((block, hash))
}

/// The digest a completion names, parsed.
pub fn claimed_digest(hex: &str) -> Result<PlainHash> {
    PlainHash::from_hex(hex)
        .ok_or_else(|| Error::invalid("invalid_hash", "digest is not 64 hex digits"))
}

/// BLAKE3 over block hashes in order: what agent and server compare at the end of a resync or
/// failback.
pub fn digest_of(hashes: &[PlainHash]) -> PlainHash {
    let mut h = blake3::Hasher::new();
    for x in hashes {
        h.update(&x.0);
    }
    PlainHash(*h.finalize().as_bytes())
}

fn check_index<S: SyncSide>(side: &S, index: u64) -> Result<()> {
    if index >= side.blocks() {
        return Err(Error::invalid(
            "block_out_of_range",
            format!(
                "block {index} is past the end of disk {} ({} blocks)",
                side.disk(),
                side.blocks()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A side of three 8 KiB blocks, block i filled with i.
    struct Memory;

    impl SyncSide for Memory {
        fn disk(&self) -> &str {
            "d"
        }
        fn blocks(&self) -> u64 {
            3
        }
        async fn read_block(&self, index: u64) -> Result<Vec<u8>> {
            Ok(vec![index as u8; 8192])
        }
    }

    #[tokio::test]
    async fn both_directions_send_only_the_ranges_that_differ() {
        let cpu = CpuPool::new(1);
        // The other side's block 1 differs in its second 4 KiB.
        let mut theirs = vec![1u8; 8192];
        theirs[4096..].fill(9);
        let fine = fine_hashes(&Memory, &cpu, &[1]).await.unwrap();
        let differ = patch::differing_ranges(&theirs, &fine);
        assert_eq!(differ, [(4096, 4096)]);
        // Server to agent: the bytes of those ranges of the server's block.
        let sent = ranges(&Memory, 1, &differ).await.unwrap();
        assert_eq!(&sent[..], &[1u8; 4096][..]);
        // Agent to server: a patch of those ranges makes the server's block the agent's.
        let body = Bytes::from(patch::encode(&theirs, &differ));
        let mine = Memory.read_block(1).await.unwrap();
        let (got, _) = apply_patch(&cpu, 1, mine.clone(), body.clone(), PlainHash::of(&theirs))
            .await
            .unwrap();
        assert_eq!(got, theirs);
        let e = apply_patch(&cpu, 1, mine, body, PlainHash::of(&[0u8; 8192]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "hash_mismatch");
    }

    #[tokio::test]
    async fn refused_requests_name_their_problem() {
        let cpu = CpuPool::new(1);
        let code = |e: Error| e.code().to_string();
        let many = vec![0u64; MAX_FINE_BLOCKS + 1];
        assert_eq!(
            code(fine_hashes(&Memory, &cpu, &many).await.unwrap_err()),
            "query_too_large"
        );
        assert_eq!(
            code(fine_hashes(&Memory, &cpu, &[3]).await.unwrap_err()),
            "block_out_of_range"
        );
        assert_eq!(
            code(ranges(&Memory, 0, &[(0, 0)]).await.unwrap_err()),
            "invalid_range"
        );
        assert_eq!(
            code(ranges(&Memory, 0, &[(100, 10), (0, 10)]).await.unwrap_err()),
            "invalid_range"
        );
        assert_eq!(
            code(ranges(&Memory, 0, &[(8000, 200)]).await.unwrap_err()),
            "invalid_range"
        );
        assert_eq!(code(claimed_digest("xyz").unwrap_err()), "invalid_hash");
    }
}
