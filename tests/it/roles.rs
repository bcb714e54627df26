//! roles tests (issue 21).
