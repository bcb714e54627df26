//! openapi tests (issue 21).
