//! Compressed uploads (`Content-Encoding: zstd`): what the agent sends, what the server checks
//! and refuses.
