//! Materializing disks: a recovery point of a disk written as a fixed VHD.

use std::path::Path;
use std::sync::Arc;

use futures_util::StreamExt;

use super::output::{AlignedBuf, DiskOutput};
use super::service::Failovers;
use crate::chunk::digest::is_zero;
use crate::error::{Error, Result};
use crate::protection::points::PinnedReader;
use crate::replica::point::ReadInto;

const MIB: u64 = 1024 * 1024;

impl Failovers {
    /// Writes one disk at a point as a fixed VHD: size rounded up to whole MiB (Azure's rule),
    /// zero blocks left as holes, every block verified, fsynced. Returns (original, virtual) size.
    pub(super) async fn materialize(
        &self,
        reader: PinnedReader,
        path: &Path,
    ) -> Result<(u64, u64)> {
        let blocks = reader.data_blocks();
        let size = reader.base().disk_size();
        let virt = size.div_ceil(MIB) * MIB;
        let out = DiskOutput::create(path, virt + 512).map_err(|e| {
            Error::local_write(&e, format!("creating {}: {e}", path.display()), |m| {
                Error::invalid("output_not_writable", m)
            })
        })?;
        let out = Arc::new(out);
        let bs = reader.base().block_size() as u64;
        // One aligned buffer per block in flight, reused: a fresh 4 MiB buffer per block costs
        // its page faults and zeroing every time.
        let buffers = Arc::new(std::sync::Mutex::new(Vec::<AlignedBuf>::new()));
        let mut writes = futures_util::stream::iter(blocks.into_iter().map(|(i, _)| {
            let (reader, out) = (reader.clone(), out.clone());
            let buffers = buffers.clone();
            async move {
                let write_err = |e: std::io::Error| {
                    Error::local_write(&e, format!("writing disk: {e}"), |m| {
                        Error::invalid("output_not_writable", m)
                    })
                };
                let joined = |e: tokio::task::JoinError| Error::internal(e.to_string());
                let give_back = |buf: AlignedBuf| {
                    if let Ok(mut b) = buffers.lock() {
                        b.push(buf);
                    }
                };
                let buf = buffers
                    .lock()
                    .ok()
                    .and_then(|mut b| b.pop())
                    .unwrap_or_else(|| AlignedBuf::new(bs as usize));
                let at = buf.start();
                match reader.read_block_into(i, buf.into_vec(), at).await? {
                    ReadInto::Filled { buf, len } => {
                        let buf = AlignedBuf::from_vec(buf);
                        let buf = tokio::task::spawn_blocking(move || {
                            out.write_at(buf.window(len), i * bs).map(|()| buf)
                        })
                        .await
                        .map_err(joined)?
                        .map_err(write_err)?;
                        give_back(buf);
                    }
                    ReadInto::Copied { buf, data } => {
                        give_back(AlignedBuf::from_vec(buf));
                        // A block logs zeroed stays a hole (checked off the runtime: 4 MiB).
                        tokio::task::spawn_blocking(move || {
                            if is_zero(&data) {
                                return Ok(());
                            }
                            out.write_at(&data, i * bs)
                        })
                        .await
                        .map_err(joined)?
                        .map_err(write_err)?;
                    }
                }
                Ok::<(), Error>(())
            }
        }))
        .buffer_unordered(MATERIALIZE_IN_FLIGHT);
        while let Some(r) = writes.next().await {
            r?;
        }
        let mut uid = [0u8; 16];
        crate::util::fill_random(&mut uid);
        let footer = crate::format::vhd::fixed_footer(
            virt,
            uid,
            crate::format::vhd::vhd_timestamp(crate::util::unix_now()),
        )
        .map_err(|e| Error::internal(format!("VHD footer: {e}")))?;
        drop(writes);
        tokio::task::spawn_blocking(move || out.finish(&footer, virt))
            .await
            .map_err(|e| Error::internal(e.to_string()))?
            .map_err(|e| {
                Error::local_write(&e, format!("finishing disk: {e}"), |m| {
                    Error::invalid("output_not_writable", m)
                })
            })?;
        Ok((size, virt))
    }
}

/// Blocks read, verified and written at once per disk being materialized: enough to keep every
/// CPU thread decrypting and decompressing while other blocks are read from the store or
/// copied into the output file.
const MATERIALIZE_IN_FLIGHT: usize = 8;
