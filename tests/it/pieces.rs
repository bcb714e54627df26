//! Sub-block replica layers: merge and resync store only the changed pieces of a block, and
//! every reader sees one content.
