//! Several servers on one vault (issue 19).
