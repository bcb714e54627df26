//! TEMPORARY raw-only stand-in (replaced by the real readers on merge).
use std::ops::Range;
use std::path::Path;
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    VhdFixed,
    VhdDynamic,
    VhdDifferencing,
    VhdxFixed,
    VhdxDynamic,
}
pub trait DiskImage: Send + Sync {
    fn format(&self) -> ImageFormat;
    fn virtual_size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError>;
    fn allocated_ranges(&self) -> Result<Vec<Range<u64>>, ImageError>;
}
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}")]
    Io(String),
}
struct Raw(std::fs::File, u64);
impl DiskImage for Raw {
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }
    fn virtual_size(&self) -> u64 {
        self.1
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, buf, offset)
            .map_err(|e| ImageError::Io(e.to_string()))
    }
    fn allocated_ranges(&self) -> Result<Vec<Range<u64>>, ImageError> {
        Ok(vec![0..self.1])
    }
}
pub fn open(path: &Path) -> Result<Box<dyn DiskImage>, ImageError> {
    let f = std::fs::File::open(path).map_err(|e| ImageError::Io(e.to_string()))?;
    let n = f
        .metadata()
        .map_err(|e| ImageError::Io(e.to_string()))?
        .len();
    Ok(Box::new(Raw(f, n)))
}
