//! What a server refuses at start, and agents that follow several server URLs (issue 19).
