//! TEMPORARY stand-in (replaced by the real module on merge).
#[derive(Debug, thiserror::Error)]
pub enum VhdError {
    #[error("bad size")]
    Size,
}
pub fn vhd_timestamp(unix_secs: u64) -> u32 {
    unix_secs.saturating_sub(946_684_800) as u32
}
pub fn fixed_footer(
    size: u64,
    _unique_id: [u8; 16],
    _timestamp: u32,
) -> Result<[u8; 512], VhdError> {
    if size == 0 {
        return Err(VhdError::Size);
    }
    Ok([0u8; 512])
}
