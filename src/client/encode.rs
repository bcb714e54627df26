//! Upload bodies as the client sends them: blocks, resync patches and change logs go
//! zstd-compressed (`Content-Encoding: zstd`) unless the client was told not to
//! ([`Client::compress_uploads`]). Disk blocks compress to about half on typical file systems,
//! so a WAN link carries half the bytes, and the server seals a block from these compressed
//! bytes instead of compressing it again.
//!
//! Compression is CPU work: it runs on tokio's blocking pool, never on the runtime's workers,
//! one body (or one piece of a log) at a time per upload in flight, so uploads in parallel
//! compress in parallel.

use std::io::Write;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};

use super::Client;

/// zstd level of upload bodies: the server's default sealing level, so blocks sealed from the
/// agent's bytes take the space they would have taken before, and the fastest (about 650 MB/s
/// a core on disk-like data).
pub const UPLOAD_ZSTD_LEVEL: i32 = 1;

/// A block or patch body as it goes on the wire.
#[derive(Debug, Clone)]
pub struct UploadBody {
    bytes: Bytes,
    zstd: bool,
}

impl UploadBody {
    /// A body sent as it is.
    pub fn plain(bytes: Bytes) -> UploadBody {
        UploadBody { bytes, zstd: false }
    }

    /// A body sent as it is (`plain`) or zstd-compressed at `level`, whichever is smaller.
    /// Runs on the blocking pool.
    pub async fn encode(plain: Bytes, level: Option<i32>) -> UploadBody {
        let Some(level) = level else {
            return UploadBody::plain(plain);
        };
        let fallback = plain.clone();
        let compressed = tokio::task::spawn_blocking(move || {
            zstd::bulk::compress(&plain, level)
                .ok()
                .filter(|z| z.len() < plain.len())
        })
        .await
        .ok()
        .flatten();
        match compressed {
            Some(z) => UploadBody {
                bytes: Bytes::from(z),
                zstd: true,
            },
            None => UploadBody::plain(fallback),
        }
    }

    /// Bytes on the wire.
    pub fn wire_len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn is_compressed(&self) -> bool {
        self.zstd
    }

    pub(super) fn bytes(&self) -> Bytes {
        self.bytes.clone()
    }

    /// The `Content-Encoding` header the body needs, if any.
    pub(super) fn encoding(&self) -> Option<&'static str> {
        self.zstd.then_some(crate::wire::ZSTD_ENCODING)
    }
}

/// A change log's body as it goes on the wire: its pieces (compressed as they are read when
/// the client compresses uploads) and its plain length.
pub struct LogUpload {
    /// The pieces on the wire; a caller may wrap them (a bandwidth throttle sees wire bytes).
    pub pieces: BoxStream<'static, std::io::Result<Bytes>>,
    pub plain_len: u64,
    zstd: bool,
}

impl LogUpload {
    pub fn is_compressed(&self) -> bool {
        self.zstd
    }
}

impl Client {
    /// Whether upload bodies are zstd-compressed (the default) or sent as they are.
    pub fn compress_uploads(mut self, on: bool) -> Client {
        self.upload_zstd = on.then_some(UPLOAD_ZSTD_LEVEL);
        self
    }

    pub fn compresses_uploads(&self) -> bool {
        self.upload_zstd.is_some()
    }

    /// A block or patch body as this client sends it.
    pub async fn encode_body(&self, plain: Bytes) -> UploadBody {
        UploadBody::encode(plain, self.upload_zstd).await
    }

    /// A change log of `plain_len` bytes read as `pieces`, as this client sends it.
    pub fn encode_log<S>(&self, pieces: S, plain_len: u64) -> LogUpload
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        match self.upload_zstd {
            None => LogUpload {
                pieces: pieces.boxed(),
                plain_len,
                zstd: false,
            },
            Some(level) => LogUpload {
                pieces: compress_stream(pieces, level).boxed(),
                plain_len,
                zstd: true,
            },
        }
    }
}

/// One zstd stream over every piece of `pieces`, each piece compressed on the blocking pool as
/// it comes; the stream ends with the frame's epilogue.
fn compress_stream<S>(
    pieces: S,
    level: i32,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
{
    type Encoder = zstd::stream::write::Encoder<'static, Vec<u8>>;
    let encoder = Encoder::new(Vec::new(), level);
    let start = encoder.map(|e| (pieces.boxed(), e));
    futures_util::stream::unfold(Some(start), |state| async move {
        let (mut pieces, mut encoder) = match state? {
            Ok(s) => s,
            Err(e) => return Some((Err(e), None)),
        };
        loop {
            let step = match pieces.next().await {
                Some(Ok(piece)) => {
                    on_blocking_pool(move || {
                        encoder.write_all(&piece)?;
                        let out = std::mem::take(encoder.get_mut());
                        Ok((Some(encoder), out))
                    })
                    .await
                }
                Some(Err(e)) => return Some((Err(e), None)),
                None => on_blocking_pool(move || Ok((None, encoder.finish()?))).await,
            };
            match step {
                // zstd buffers up to a block before it writes: nothing to send yet.
                Ok((Some(e), out)) if out.is_empty() => encoder = e,
                Ok((next, out)) => {
                    let state = next.map(|e| Ok((pieces, e)));
                    return Some((Ok(Bytes::from(out)), state));
                }
                Err(e) => return Some((Err(e), None)),
            }
        }
    })
}

async fn on_blocking_pool<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| b"a change log, compressed "[i % 25])
            .collect()
    }

    #[tokio::test]
    async fn a_log_stream_compresses_to_one_zstd_stream_of_the_same_bytes() {
        let plain = text(3 << 20);
        let pieces: Vec<std::io::Result<Bytes>> = plain
            .chunks(256 * 1024)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let out: Vec<Bytes> = compress_stream(futures_util::stream::iter(pieces), 1)
            .map(|p| p.unwrap())
            .collect()
            .await;
        let wire: Vec<u8> = out.concat();
        assert!(wire.len() < plain.len() / 10, "{} bytes", wire.len());
        assert_eq!(zstd::stream::decode_all(&wire[..]).unwrap(), plain);
    }

    #[tokio::test]
    async fn a_body_is_compressed_only_when_that_makes_it_smaller() {
        let plain = Bytes::from(text(1 << 20));
        let b = UploadBody::encode(plain.clone(), Some(1)).await;
        assert!(b.is_compressed() && b.wire_len() < plain.len() as u64 / 10);
        let mut random = vec![0u8; 1 << 20];
        crate::util::fill_random(&mut random);
        let b = UploadBody::encode(Bytes::from(random.clone()), Some(1)).await;
        assert!(!b.is_compressed());
        assert_eq!(b.bytes(), random);
        assert!(!UploadBody::encode(plain, None).await.is_compressed());
    }
}
