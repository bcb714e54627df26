//! cli_conventions tests (issue 21).
