//! VHDX out: export and full failback written as dynamic VHDX, checked by qemu-img and the
//! project's own reader.
