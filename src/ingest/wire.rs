//! Upload bodies as they come off the wire: as they are (identity) or compressed with zstd
//! (`Content-Encoding: zstd`, what the reference agent sends).
//!
//! A compressed body is inflated with a hard bound before anything is hashed or stored, so a
//! zstd bomb (a small body claiming gigabytes) is refused as soon as it passes the bound,
//! without the server ever allocating what it claims:
//!
//! * a block or patch into one buffer of the route's limit (a block's size), allocated up front
//!   and never grown ([`decode_block`]); the compressed bytes are kept, so a block's chunk can be
//!   sealed from them instead of compressing the block again (the hash is checked on the plain
//!   bytes first, see [`crate::chunk::ChunkStore::put_block_with_payload`]);
//! * a change log in pieces of at most [`INFLATE_PIECE`] bytes as its body streams in
//!   ([`LogInflater`]), up to the length the agent declared for it
//!   ([`crate::wire::PLAIN_LENGTH_HEADER`]), and with a bounded decoder window.
//!
//! Inflating is CPU work: callers run it on the CPU pool, never on the runtime's workers.

use bytes::Bytes;
use zstd::stream::raw::{Decoder, Operation};

use crate::chunk::seal::{inflate_bounded, InflateError};
use crate::error::Error;

/// Largest piece of plain log bytes inflated in one step (one log frame's worth).
pub const INFLATE_PIECE: usize = crate::file_formats::LOG_FRAME_LEN;

/// Largest zstd window (log2 bytes) a compressed log may use: 4 MiB, what zstd picks by itself
/// for levels up to 16. The decoder holds one window per log upload, reserved from the host's
/// body memory with the frame buffer ([`log_body_memory`]).
pub const LOG_WINDOW_LOG_MAX: u32 = 22;

/// How an upload body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEncoding {
    Identity,
    Zstd,
}

impl BodyEncoding {
    /// From the `Content-Encoding` header's value (absent: identity).
    pub fn from_header(value: Option<&[u8]>) -> Result<BodyEncoding, WireError> {
        let Some(raw) = value else {
            return Ok(BodyEncoding::Identity);
        };
        let text = String::from_utf8_lossy(raw);
        let v = text.trim();
        if v.eq_ignore_ascii_case("identity") {
            Ok(BodyEncoding::Identity)
        } else if v.eq_ignore_ascii_case(crate::wire::ZSTD_ENCODING) {
            Ok(BodyEncoding::Zstd)
        } else {
            // Quoted back in the error: no more of it than a name needs.
            Err(WireError::UnsupportedEncoding {
                encoding: v.chars().take(64).collect(),
            })
        }
    }
}

/// Why an upload body could not be decoded. Nothing is stored for such a body.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("Content-Encoding {encoding:?} is not supported: send the body as it is or compressed with zstd (Content-Encoding: zstd)")]
    UnsupportedEncoding { encoding: String },
    #[error("{what} body inflates to more than its {bound}-byte limit; nothing was stored")]
    TooLong { what: &'static str, bound: u64 },
    #[error("{what} body is not a complete zstd stream ({reason}); nothing was stored")]
    Invalid { what: &'static str, reason: String },
    #[error(
        "{what} body inflates to {got} bytes, but {declared} were declared; nothing was stored"
    )]
    LengthMismatch {
        what: &'static str,
        got: u64,
        declared: u64,
    },
    #[error(
        "a zstd-compressed log needs header {} with its length before compression",
        crate::wire::PLAIN_LENGTH_HEADER
    )]
    MissingPlainLength,
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Error {
        let code = match &e {
            WireError::UnsupportedEncoding { .. } => {
                return Error::UnsupportedMedia {
                    code: "unsupported_content_encoding",
                    message: e.to_string(),
                }
            }
            WireError::TooLong { .. } => "decompressed_too_long",
            WireError::Invalid { .. } => "invalid_zstd",
            WireError::LengthMismatch { .. } => "plain_length_mismatch",
            WireError::MissingPlainLength => "missing_plain_length",
        };
        Error::invalid(code, e.to_string())
    }
}

/// A block or patch body: its plain bytes and, when it came compressed, the zstd bytes they
/// were inflated from.
#[derive(Debug, Clone)]
pub struct BlockBody {
    pub plain: Bytes,
    pub zstd: Option<Bytes>,
}

/// Decodes a block or patch body of at most `bound` plain bytes (`what` names it in errors).
pub fn decode_block(
    encoding: BodyEncoding,
    body: Bytes,
    bound: usize,
    what: &'static str,
) -> Result<BlockBody, WireError> {
    match encoding {
        BodyEncoding::Identity => Ok(BlockBody {
            plain: body,
            zstd: None,
        }),
        BodyEncoding::Zstd => match inflate_bounded(&body, bound) {
            Ok(plain) => Ok(BlockBody {
                plain: Bytes::from(plain),
                zstd: Some(body),
            }),
            Err(InflateError::TooLong { bound }) => Err(WireError::TooLong {
                what,
                bound: bound as u64,
            }),
            Err(InflateError::Invalid { reason }) => Err(WireError::Invalid {
                what,
                reason: reason.to_string(),
            }),
        },
    }
}

/// Body memory a log upload holds while it is received: its frame buffer, and for a compressed
/// one the decoder's window and one inflated piece.
pub fn log_body_memory(encoding: BodyEncoding) -> u64 {
    let frame = crate::file_formats::LOG_FRAME_LEN as u64;
    match encoding {
        BodyEncoding::Identity => frame,
        BodyEncoding::Zstd => frame + (1u64 << LOG_WINDOW_LOG_MAX) + INFLATE_PIECE as u64,
    }
}

/// Inflates a compressed change log as its body arrives: [`feed`](Self::feed) each piece of
/// the body, then take [`next_piece`](Self::next_piece) until it answers `None`; at the end,
/// [`finish`](Self::finish) checks the stream was complete and of the declared length.
pub struct LogInflater {
    decoder: Decoder<'static>,
    input: Bytes,
    pos: usize,
    /// The last step filled its output: the decoder may hold more for the next one.
    pending: bool,
    /// zstd's hint after the last step: 0 once a frame is complete and flushed.
    hint: usize,
    inflated: u64,
    declared: u64,
}

impl LogInflater {
    /// A decoder for a log of `declared` plain bytes.
    pub fn new(declared: u64) -> Result<LogInflater, WireError> {
        let invalid = |e: std::io::Error| WireError::Invalid {
            what: "log",
            reason: e.to_string(),
        };
        let mut decoder = Decoder::new().map_err(invalid)?;
        decoder
            .set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
                LOG_WINDOW_LOG_MAX,
            ))
            .map_err(invalid)?;
        Ok(LogInflater {
            decoder,
            input: Bytes::new(),
            pos: 0,
            pending: false,
            // Nothing read yet: not a complete stream.
            hint: 1,
            inflated: 0,
            declared,
        })
    }

    /// Hands over the next piece of the compressed body (after the last one was used up).
    pub fn feed(&mut self, piece: Bytes) {
        debug_assert!(self.pos == self.input.len() && !self.pending);
        self.input = piece;
        self.pos = 0;
    }

    /// The next at most [`INFLATE_PIECE`] plain bytes from what was fed, or `None` once it is
    /// used up. Refuses a log that inflates past its declared length as soon as it does.
    pub fn next_piece(&mut self) -> Result<Option<Bytes>, WireError> {
        let mut out = vec![0u8; INFLATE_PIECE];
        let mut filled = 0usize;
        while filled < out.len() && (self.pos < self.input.len() || self.pending) {
            let status = self
                .decoder
                .run_on_buffers(&self.input[self.pos..], &mut out[filled..])
                .map_err(|e| WireError::Invalid {
                    what: "log",
                    reason: e.to_string(),
                })?;
            self.pos += status.bytes_read;
            filled += status.bytes_written;
            self.hint = status.remaining;
            self.pending = filled == out.len();
            self.inflated += status.bytes_written as u64;
            if self.inflated > self.declared {
                return Err(WireError::TooLong {
                    what: "log",
                    bound: self.declared,
                });
            }
            if status.bytes_read == 0 && status.bytes_written == 0 {
                break;
            }
        }
        if filled == 0 {
            return Ok(None);
        }
        out.truncate(filled);
        Ok(Some(Bytes::from(out)))
    }

    /// After the last piece: the plain length, once the stream ended on a complete frame and
    /// inflated to exactly the declared length.
    pub fn finish(&self) -> Result<u64, WireError> {
        if self.hint != 0 || self.pending {
            return Err(WireError::Invalid {
                what: "log",
                reason: "the stream ends inside a frame (truncated)".into(),
            });
        }
        if self.inflated != self.declared {
            return Err(WireError::LengthMismatch {
                what: "log",
                got: self.inflated,
                declared: self.declared,
            });
        }
        Ok(self.inflated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Vec<u8> {
        (0..n).map(|i| b"change log bytes "[i % 17]).collect()
    }

    /// Inflates `compressed` fed in pieces of `piece` bytes, as the log route does.
    fn inflate_log(compressed: &[u8], piece: usize, declared: u64) -> Result<Vec<u8>, WireError> {
        let mut inf = LogInflater::new(declared)?;
        let mut plain = Vec::new();
        for p in compressed.chunks(piece) {
            inf.feed(Bytes::copy_from_slice(p));
            while let Some(out) = inf.next_piece()? {
                assert!(out.len() <= INFLATE_PIECE);
                plain.extend_from_slice(&out);
            }
        }
        inf.finish()?;
        Ok(plain)
    }

    #[test]
    fn content_encodings_are_identity_zstd_or_refused() {
        assert_eq!(BodyEncoding::from_header(None), Ok(BodyEncoding::Identity));
        assert_eq!(
            BodyEncoding::from_header(Some(b" ZSTD ")),
            Ok(BodyEncoding::Zstd)
        );
        assert_eq!(
            BodyEncoding::from_header(Some(b"identity")),
            Ok(BodyEncoding::Identity)
        );
        let e = BodyEncoding::from_header(Some(b"gzip")).unwrap_err();
        assert_eq!(Error::from(e).code(), "unsupported_content_encoding");
    }

    #[test]
    fn a_block_inflates_within_its_bound_and_a_bomb_is_refused() {
        let plain = text(256 * 1024);
        let z = zstd::bulk::compress(&plain, 3).unwrap();
        let b = decode_block(
            BodyEncoding::Zstd,
            Bytes::from(z.clone()),
            plain.len(),
            "block",
        )
        .unwrap();
        assert_eq!(b.plain, plain);
        assert_eq!(b.zstd.as_deref(), Some(&z[..]));
        // 64 MiB of zeros compress to a few KiB: one byte of bound less refuses it.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
        assert!(bomb.len() < 64 * 1024);
        let e = decode_block(BodyEncoding::Zstd, Bytes::from(bomb), 1 << 20, "block").unwrap_err();
        assert_eq!(
            e,
            WireError::TooLong {
                what: "block",
                bound: 1 << 20
            }
        );
        let e = decode_block(
            BodyEncoding::Zstd,
            Bytes::from(z[..z.len() / 2].to_vec()),
            plain.len(),
            "block",
        )
        .unwrap_err();
        assert!(matches!(e, WireError::Invalid { .. }), "{e:?}");
    }

    #[test]
    fn a_log_inflates_in_bounded_pieces_to_its_declared_length() {
        let plain = text(3 * INFLATE_PIECE + 12345);
        let z = zstd::stream::encode_all(&plain[..], 1).unwrap();
        for piece in [1usize, 7, 4096, z.len()] {
            assert_eq!(inflate_log(&z, piece, plain.len() as u64).unwrap(), plain);
        }
        let short = inflate_log(&z[..z.len() - 3], 4096, plain.len() as u64).unwrap_err();
        assert!(matches!(short, WireError::Invalid { .. }), "{short:?}");
        let e = inflate_log(&z, 4096, plain.len() as u64 + 1).unwrap_err();
        assert!(matches!(e, WireError::LengthMismatch { .. }), "{e:?}");
        // Declared shorter than it is: refused once it passes, before the rest is inflated.
        let e = inflate_log(&z, 4096, 1000).unwrap_err();
        assert_eq!(
            e,
            WireError::TooLong {
                what: "log",
                bound: 1000
            }
        );
        assert_eq!(
            LogInflater::new(0).unwrap().finish().unwrap_err(),
            WireError::Invalid {
                what: "log",
                reason: "the stream ends inside a frame (truncated)".into()
            }
        );
    }
}
