//! A safe owner of one zlib inflate stream, for the two calls the safe APIs lack:
//! `inflatePrime` (start mid-byte) and inflating a block at a time (`Z_BLOCK`).

#![allow(unsafe_code)] // zlib's C API, implemented in Rust by zlib-rs

use libz_rs_sys as z;

/// How an inflate call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// More input or output room needed, or a block boundary was reached (`Z_BLOCK`).
    Progress,
    /// The deflate stream (or gzip member) ended.
    End,
}

/// What one [`RawInflater::inflate`] call did.
#[derive(Debug, Clone, Copy)]
pub struct Inflated {
    pub step: Step,
    pub consumed: usize,
    pub produced: usize,
}

pub struct RawInflater {
    // Boxed: zlib's state points back at its stream, which must therefore never move.
    stream: Box<z::z_stream>,
}

impl RawInflater {
    /// `window_bits` as for zlib's `inflateInit2`: -15 raw deflate, 31 gzip.
    pub fn new(window_bits: i32) -> Result<RawInflater, i32> {
        let mut stream = Box::new(z::z_stream::default());
        let size = std::mem::size_of::<z::z_stream>() as i32;
        // SAFETY: `stream` is a default-initialized z_stream (null allocator functions,
        // so zlib-rs uses its own) that stays at one address for its whole life, and the
        // version string is zlib-rs's own, NUL-terminated.
        let ret = unsafe { z::inflateInit2_(&mut *stream, window_bits, z::zlibVersion(), size) };
        if ret != z::Z_OK {
            return Err(ret);
        }
        Ok(RawInflater { stream })
    }

    /// Feeds the low `bits` bits of `value` first, as if they ended the previous byte.
    pub fn prime(&mut self, bits: u8, value: u8) -> Result<(), i32> {
        // SAFETY: the stream was initialized by `new` and has not moved.
        let ret = unsafe { z::inflatePrime(&mut *self.stream, i32::from(bits), i32::from(value)) };
        if ret == z::Z_OK { Ok(()) } else { Err(ret) }
    }

    /// The 32 KiB of output that came before (a raw stream's back-references reach it).
    pub fn set_dictionary(&mut self, window: &[u8]) -> Result<(), i32> {
        let len = u32::try_from(window.len()).map_err(|_| z::Z_STREAM_ERROR)?;
        // SAFETY: initialized stream; `window` is valid for `len` bytes during the call,
        // which copies it.
        let ret = unsafe { z::inflateSetDictionary(&mut *self.stream, window.as_ptr(), len) };
        if ret == z::Z_OK { Ok(()) } else { Err(ret) }
    }

    /// Inflates from `input` into `output`; with `stop_at_blocks`, returns at the end of
    /// each deflate block too. Errors are zlib's codes (`Z_DATA_ERROR`, ...).
    pub fn inflate(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        stop_at_blocks: bool,
    ) -> Result<Inflated, i32> {
        let avail_in = u32::try_from(input.len()).unwrap_or(u32::MAX);
        let avail_out = u32::try_from(output.len()).unwrap_or(u32::MAX);
        let s = &mut *self.stream;
        s.next_in = input.as_ptr();
        s.avail_in = avail_in;
        s.next_out = output.as_mut_ptr();
        s.avail_out = avail_out;
        let flush = if stop_at_blocks {
            z::Z_BLOCK
        } else {
            z::Z_NO_FLUSH
        };
        // SAFETY: initialized stream; next_in/avail_in and next_out/avail_out describe
        // `input` and `output`, both borrowed for the whole call; zlib keeps no pointer
        // into them past it (they are cleared below).
        let ret = unsafe { z::inflate(s, flush) };
        let consumed = (avail_in - s.avail_in) as usize;
        let produced = (avail_out - s.avail_out) as usize;
        s.next_in = std::ptr::null();
        s.avail_in = 0;
        s.next_out = std::ptr::null_mut();
        s.avail_out = 0;
        let step = match ret {
            z::Z_OK | z::Z_BUF_ERROR => Step::Progress,
            z::Z_STREAM_END => Step::End,
            z::Z_NEED_DICT => return Err(z::Z_DATA_ERROR),
            other => return Err(other),
        };
        Ok(Inflated {
            step,
            consumed,
            produced,
        })
    }

    /// zlib's `data_type` after the last call: bit 7 set at a block boundary (bit 6 as
    /// well after the last block), bits 0-2 the unused bits of the last byte consumed.
    pub fn data_type(&self) -> i32 {
        self.stream.data_type
    }
}

impl Drop for RawInflater {
    fn drop(&mut self) {
        // SAFETY: initialized by `new`, ended once, here.
        unsafe {
            z::inflateEnd(&mut *self.stream);
        }
    }
}
