//! Staged blocks: the receipts of blocks received for a block map that is not committed yet
//! (an initial replication's session, a resync session's disk).
//!
//! Each accepted block is stored as a chunk first, then a small sealed *receipt* is written at
//! `stage/<vm>/<disk>/<session>/<index>`, and only then is the block acknowledged: an
//! acknowledged block is durable and reachable, and a restarted server rebuilds what a session
//! holds from its receipts.

use std::collections::BTreeMap;

use futures_util::StreamExt;

use crate::chunk::{ChunkName, PlainHash};
use crate::error::{Error, Result};
use crate::file_formats::{ObjectKind, RECEIPT_LEN};
use crate::vault::Vault;

/// One received block: its chunk (`None` for a zero block) and plain hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Receipt {
    pub name: Option<ChunkName>,
    pub hash: PlainHash,
}

/// Parses a receipt's plaintext; `None` when it is not `RECEIPT_LEN` bytes.
pub(crate) fn parse_receipt(plain: &[u8]) -> Option<Receipt> {
    if plain.len() != RECEIPT_LEN {
        return None;
    }
    let n: [u8; 32] = crate::format::array_at(plain, 0);
    let h: [u8; 32] = crate::format::array_at(plain, 32);
    Some(Receipt {
        name: (n != [0u8; 32]).then_some(ChunkName(n)),
        hash: PlainHash(h),
    })
}

/// Every receipt under a session prefix, by block index.
pub(crate) async fn load_receipts(
    vault: &Vault,
    prefix: &crate::store::Key,
    disk: &str,
) -> Result<BTreeMap<u64, Receipt>> {
    let listed = vault.store().list(prefix).await?;
    let chunks = vault.chunks.clone();
    let mut loads = futures_util::stream::iter(listed.into_iter().filter_map(|l| {
        let index: u64 = l.key.name().parse().ok()?;
        Some((index, l.key))
    }))
    .map(|(index, key)| {
        let chunks = chunks.clone();
        async move { (index, chunks.get_sealed(ObjectKind::Receipt, &key).await) }
    })
    .buffer_unordered(32);
    let mut out = BTreeMap::new();
    while let Some((index, r)) = loads.next().await {
        let plain = r?;
        let receipt = parse_receipt(&plain).ok_or_else(|| {
            Error::internal(format!(
                "receipt {index} of disk {disk} has length {}",
                plain.len()
            ))
        })?;
        out.insert(index, receipt);
    }
    Ok(out)
}

/// Writes the sealed receipt of a stored block (after the chunk, before the acknowledgement).
pub(crate) async fn write_receipt(
    vault: &Vault,
    key: &crate::store::Key,
    put: &crate::chunk::pipeline::BlockPut,
) -> Result<()> {
    let mut plain = Vec::with_capacity(RECEIPT_LEN);
    plain.extend_from_slice(&put.name.map(|n| n.0).unwrap_or([0u8; 32]));
    plain.extend_from_slice(&put.hash.0);
    plain.extend_from_slice(&put.len.to_le_bytes());
    vault
        .chunks
        .put_sealed(ObjectKind::Receipt, key, plain)
        .await?;
    Ok(())
}

/// Deletes a session's receipts in the background (best effort: the map or the cancelled
/// session no longer refers to them, and garbage collection takes what is left).
pub(crate) fn drop_receipts(vault: &Vault, tasks: &crate::tasks::Tasks, prefix: crate::store::Key) {
    let store = vault.store().clone();
    tasks.spawn("stage delete", async move {
        if let Ok(items) = store.list(&prefix).await {
            for l in items {
                let _ = store.delete(&l.key).await;
            }
        }
    });
}
