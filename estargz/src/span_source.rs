//! What a layer of [`crate::Format::Soci`] needs beyond its index: its chunks are pieces
//! of spans (a compressed range inflated from a checkpoint of the gzip stream), and only
//! the zTOC's owner knows the checkpoints and span digests.

use crate::error::Result;

pub trait SpanSource: Send + Sync {
    /// Checks `compressed` (all of the span that starts at blob offset `comp_offset`)
    /// against the span's digest, then inflates the whole span.
    fn inflate_span(&self, comp_offset: u64, compressed: &[u8]) -> Result<Vec<u8>>;

    /// [`SpanSource::inflate_span`], handing the first `first` bytes of the output to
    /// `on_first` as soon as they are out (its waiters need not wait for the rest).
    fn inflate_span_staged(
        &self,
        comp_offset: u64,
        compressed: &[u8],
        first: usize,
        on_first: &mut dyn FnMut(&[u8]),
    ) -> Result<Vec<u8>> {
        let span = self.inflate_span(comp_offset, compressed)?;
        on_first(&span[..first.min(span.len())]);
        Ok(span)
    }
}
