//! Heartbeats and health: what the server knows of every host and VM.
