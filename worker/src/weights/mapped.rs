//! What both formats do with a mapped file: map it read-only, and drop the pages a load has
//! read from the resident set as it goes, so a worker's peak memory is its shard, not the model.

use std::fs::File;
use std::ops::Range;
use std::path::Path;

use memmap2::{Mmap, UncheckedAdvice};

use crate::error::LoadError;

/// Bytes read between two releases of mapped pages: bounds a load's transient RSS.
pub(super) const RELEASE_EVERY: usize = 8 << 20;

/// Maps the model file at `path` read-only.
pub(super) fn map_file(path: &Path) -> Result<Mmap, LoadError> {
    let io = |source| LoadError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    // SAFETY: model files are treated as read-only inputs; a process truncating them while we
    // run is outside what any model server can defend against (the same contract as candle's
    // and safetensors' own mmap loaders). Each format checks its tensors' ranges against the
    // file's size before reading them.
    unsafe { Mmap::map(&file) }.map_err(io)
}

/// Releases a map's pages behind a reader that walks it in file order: once at least
/// [`RELEASE_EVERY`] bytes were read since the last release, and what is left when dropped.
pub(super) struct ReleaseBehind<'a> {
    mmap: &'a Mmap,
    /// Read since the last release, as one span.
    touched: Option<Range<usize>>,
}

impl<'a> ReleaseBehind<'a> {
    pub(super) fn new(mmap: &'a Mmap) -> Self {
        Self {
            mmap,
            touched: None,
        }
    }

    /// Notes that `read`, which follows everything noted so far, has been read.
    pub(super) fn read(&mut self, read: Range<usize>) {
        let span = self
            .touched
            .take()
            .map_or(read.clone(), |t| t.start..read.end);
        if span.len() >= RELEASE_EVERY {
            release_pages(self.mmap, span);
        } else {
            self.touched = Some(span);
        }
    }
}

impl Drop for ReleaseBehind<'_> {
    fn drop(&mut self) {
        if let Some(span) = self.touched.take() {
            release_pages(self.mmap, span);
        }
    }
}

/// Drops the pages of `span` of a read-only map from this process's resident set; they are
/// read again from the file if ever touched.
fn release_pages(mmap: &Mmap, span: Range<usize>) {
    if span.is_empty() || span.end > mmap.len() {
        return;
    }
    // SAFETY: the mapping is a read-only private map of a file we never write through, so
    // MADV_DONTNEED cannot discard data: a later access re-reads the same bytes from the file.
    // The range was checked to lie inside the map.
    let _ =
        unsafe { mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, span.start, span.len()) };
}
