//! webhooks tests (issue 21).
