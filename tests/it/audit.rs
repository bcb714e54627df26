//! audit tests (issue 21).
