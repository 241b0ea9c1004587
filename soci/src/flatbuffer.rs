//! The few parts of FlatBuffers a zTOC needs: tables of scalars, strings, byte vectors
//! and vectors of tables. The [`Builder`] lays a buffer out exactly as the Go runtime's
//! builder does (back to front, the same alignment, vtables shared with the most recent
//! equal one), so a zTOC written here can be byte-identical to soci's. The reader checks
//! every offset against the buffer and counts the bytes it copies out, so a crafted
//! buffer can neither read out of bounds nor make many copies of one shared string.

const VTABLE_METADATA_FIELDS: usize = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReadError {
    #[error("offset {0} points outside the {1}-byte buffer")]
    OutOfBounds(u64, usize),
    #[error("bad vtable at {0}")]
    BadVtable(usize),
    #[error("the buffer's strings and vectors add up to more than its size (shared data)")]
    SharedData,
}

/// Builds a buffer from the leaves up, the last thing written first in the buffer.
/// Offsets are distances from the buffer's end, as in every FlatBuffers runtime.
pub struct Builder {
    /// The buffer back to front: `reversed[k]` is the byte `k + 1` before the end.
    reversed: Vec<u8>,
    min_align: usize,
    /// Where each field of the table being built was written (0: not written).
    vtable: Vec<u32>,
    object_end: u32,
    /// Every vtable written so far, by offset, for sharing.
    vtables: Vec<u32>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            reversed: Vec::new(),
            min_align: 1,
            vtable: Vec::new(),
            object_end: 0,
            vtables: Vec::new(),
        }
    }
}

impl Builder {
    /// How many bytes are written: the offset of the last thing written.
    pub fn offset(&self) -> u32 {
        self.reversed.len() as u32
    }

    fn pad(&mut self, n: usize) {
        self.reversed.resize(self.reversed.len() + n, 0);
    }

    /// Pads so that a `size`-aligned value lands aligned after `additional` more bytes.
    fn prep(&mut self, size: usize, additional: usize) {
        self.min_align = self.min_align.max(size);
        let align = (!(self.reversed.len() + additional)).wrapping_add(1) & (size - 1);
        self.pad(align);
    }

    /// Writes `bytes` (in buffer order) in front of everything written so far.
    fn place(&mut self, bytes: &[u8]) {
        self.reversed.extend(bytes.iter().rev());
    }

    fn prepend_u16(&mut self, v: u16) {
        self.prep(2, 0);
        self.place(&v.to_le_bytes());
    }

    fn prepend_u32(&mut self, v: u32) {
        self.prep(4, 0);
        self.place(&v.to_le_bytes());
    }

    /// A reference to the thing at `target`, relative to where the reference lands.
    pub fn prepend_offset(&mut self, target: u32) {
        self.prep(4, 0);
        let relative = self.offset() - target + 4;
        self.place(&relative.to_le_bytes());
    }

    pub fn create_string(&mut self, s: &[u8]) -> u32 {
        self.prep(4, s.len() + 1);
        self.place(&[0]);
        self.place(s);
        self.end_vector(s.len())
    }

    pub fn create_byte_vector(&mut self, v: &[u8]) -> u32 {
        self.prep(4, v.len());
        self.place(v);
        self.end_vector(v.len())
    }

    /// A vector of the tables at `offsets`, in that order.
    pub fn create_offset_vector(&mut self, offsets: &[u32]) -> u32 {
        self.prep(4, 4 * offsets.len());
        for &offset in offsets.iter().rev() {
            self.prepend_offset(offset);
        }
        self.end_vector(offsets.len())
    }

    fn end_vector(&mut self, len: usize) -> u32 {
        self.place(&(len as u32).to_le_bytes());
        self.offset()
    }

    pub fn start_table(&mut self, fields: usize) {
        self.vtable.clear();
        self.vtable.resize(fields, 0);
        self.object_end = self.offset();
        self.min_align = 1;
    }

    /// Writes field `slot` unless it holds the schema's default, as generated code does.
    pub fn add_i64(&mut self, slot: usize, v: i64, default: i64) {
        if v != default {
            self.prep(8, 0);
            self.place(&v.to_le_bytes());
            self.vtable[slot] = self.offset();
        }
    }

    pub fn add_u32(&mut self, slot: usize, v: u32, default: u32) {
        if v != default {
            self.prepend_u32(v);
            self.vtable[slot] = self.offset();
        }
    }

    pub fn add_i32(&mut self, slot: usize, v: i32, default: i32) {
        self.add_u32(slot, v as u32, default as u32);
    }

    pub fn add_i8(&mut self, slot: usize, v: i8, default: i8) {
        if v != default {
            self.prep(1, 0);
            self.place(&v.to_le_bytes());
            self.vtable[slot] = self.offset();
        }
    }

    pub fn add_offset(&mut self, slot: usize, target: u32) {
        if target != 0 {
            self.prepend_offset(target);
            self.vtable[slot] = self.offset();
        }
    }

    /// Ends the table: its vtable is the most recent equal one already written, or a
    /// new one written just before the table.
    pub fn end_table(&mut self) -> u32 {
        self.prep(4, 0);
        self.place(&[0; 4]);
        let object = self.offset();
        let wanted: Vec<u16> = self
            .vtable
            .iter()
            .map(|&at| if at == 0 { 0 } else { (object - at) as u16 })
            .collect();
        let existing = self
            .vtables
            .iter()
            .rev()
            .copied()
            .find(|&vt| self.vtable_fields_at(vt) == wanted);
        let vtable = match existing {
            Some(vt) => vt,
            None => {
                for &field in wanted.iter().rev() {
                    self.prepend_u16(field);
                }
                self.prepend_u16((object - self.object_end) as u16);
                self.prepend_u16(((wanted.len() + VTABLE_METADATA_FIELDS) * 2) as u16);
                let vt = self.offset();
                self.vtables.push(vt);
                vt
            }
        };
        // The table starts with the distance back to its vtable (negative: before it).
        let relative = (i64::from(vtable) - i64::from(object)) as i32;
        self.write_at(object, &relative.to_le_bytes());
        object
    }

    /// The field entries of the vtable written at offset `vt`.
    fn vtable_fields_at(&self, vt: u32) -> Vec<u16> {
        let read_u16 = |at: u32| {
            let at = at as usize;
            u16::from_le_bytes([self.reversed[at - 1], self.reversed[at - 2]])
        };
        let len = usize::from(read_u16(vt)) / 2;
        (VTABLE_METADATA_FIELDS..len)
            .map(|i| read_u16(vt - 2 * i as u32))
            .collect()
    }

    /// Overwrites the bytes of the thing written at offset `at`.
    fn write_at(&mut self, at: u32, bytes: &[u8]) {
        let at = at as usize;
        for (i, &b) in bytes.iter().enumerate() {
            self.reversed[at - 1 - i] = b;
        }
    }

    /// The finished buffer, `root` its root table.
    pub fn finish(mut self, root: u32) -> Vec<u8> {
        self.prep(self.min_align, 4);
        self.prepend_offset(root);
        self.reversed.reverse();
        self.reversed
    }
}

/// Reads a buffer, every access checked.
pub struct Reader<'a> {
    buf: &'a [u8],
    /// Bytes of strings and vectors still allowed out: an honest buffer holds each once.
    budget: std::cell::Cell<usize>,
}

/// A table in a [`Reader`]'s buffer.
#[derive(Clone, Copy)]
pub struct Table {
    at: usize,
    vtable: usize,
    vtable_len: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader {
            buf,
            budget: std::cell::Cell::new(buf.len()),
        }
    }

    fn bytes(&self, at: u64, len: u64) -> Result<&'a [u8], ReadError> {
        let end = at.checked_add(len).filter(|&e| e <= self.buf.len() as u64);
        match end {
            Some(end) => Ok(&self.buf[at as usize..end as usize]),
            None => Err(ReadError::OutOfBounds(at, self.buf.len())),
        }
    }

    fn u16_at(&self, at: u64) -> Result<u16, ReadError> {
        let b = self.bytes(at, 2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32_at(&self, at: u64) -> Result<u32, ReadError> {
        let b = self.bytes(at, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Follows the reference stored at `at`.
    fn follow(&self, at: u64) -> Result<u64, ReadError> {
        Ok(at + u64::from(self.u32_at(at)?))
    }

    pub fn root(&self) -> Result<Table, ReadError> {
        let at = self.follow(0)?;
        self.table(at)
    }

    fn table(&self, at: u64) -> Result<Table, ReadError> {
        let to_vtable = i64::from(self.u32_at(at)? as i32);
        let vtable = at as i64 - to_vtable;
        if vtable < 0 {
            return Err(ReadError::OutOfBounds(0, self.buf.len()));
        }
        let vtable_len = u64::from(self.u16_at(vtable as u64)?);
        if vtable_len < 4 || vtable_len % 2 != 0 {
            return Err(ReadError::BadVtable(vtable as usize));
        }
        self.bytes(vtable as u64, vtable_len)?;
        Ok(Table {
            at: at as usize,
            vtable: vtable as usize,
            vtable_len: vtable_len as usize,
        })
    }

    /// Where field `slot` of `table` is, if it is present.
    fn field(&self, table: Table, slot: usize) -> Result<Option<u64>, ReadError> {
        let entry = 4 + 2 * slot;
        if entry + 2 > table.vtable_len {
            return Ok(None);
        }
        match self.u16_at((table.vtable + entry) as u64)? {
            0 => Ok(None),
            off => Ok(Some((table.at + usize::from(off)) as u64)),
        }
    }

    pub fn i64(&self, table: Table, slot: usize, default: i64) -> Result<i64, ReadError> {
        match self.field(table, slot)? {
            Some(at) => {
                let b = self.bytes(at, 8)?;
                Ok(i64::from_le_bytes(b.try_into().unwrap_or_default()))
            }
            None => Ok(default),
        }
    }

    pub fn u32(&self, table: Table, slot: usize, default: u32) -> Result<u32, ReadError> {
        match self.field(table, slot)? {
            Some(at) => self.u32_at(at),
            None => Ok(default),
        }
    }

    pub fn i8(&self, table: Table, slot: usize, default: i8) -> Result<i8, ReadError> {
        match self.field(table, slot)? {
            Some(at) => Ok(self.bytes(at, 1)?[0] as i8),
            None => Ok(default),
        }
    }

    /// A string or byte vector field's bytes (empty when absent).
    pub fn bytes_field(&self, table: Table, slot: usize) -> Result<&'a [u8], ReadError> {
        match self.field(table, slot)? {
            Some(at) => self.vector(self.follow(at)?, 1),
            None => Ok(&[]),
        }
    }

    /// The elements of the vector at `at`, `size` bytes each, charged to the budget.
    fn vector(&self, at: u64, size: u64) -> Result<&'a [u8], ReadError> {
        let len = u64::from(self.u32_at(at)?) * size;
        let elements = self.bytes(at + 4, len)?;
        let left = self
            .budget
            .get()
            .checked_sub(elements.len())
            .ok_or(ReadError::SharedData)?;
        self.budget.set(left);
        Ok(elements)
    }

    /// The table field `slot` of `table` refers to.
    pub fn table_field(&self, table: Table, slot: usize) -> Result<Option<Table>, ReadError> {
        match self.field(table, slot)? {
            Some(at) => Ok(Some(self.table(self.follow(at)?)?)),
            None => Ok(None),
        }
    }

    /// How many references a vector field holds, and where the first is.
    fn offset_vector(&self, table: Table, slot: usize) -> Result<(u64, usize), ReadError> {
        match self.field(table, slot)? {
            Some(at) => {
                let vector = self.follow(at)?;
                let elements = self.vector(vector, 4)?;
                Ok((vector + 4, elements.len() / 4))
            }
            None => Ok((0, 0)),
        }
    }

    /// The tables a vector field refers to.
    pub fn tables(&self, table: Table, slot: usize) -> Result<Vec<Table>, ReadError> {
        let (first, count) = self.offset_vector(table, slot)?;
        (0..count as u64)
            .map(|i| self.table(self.follow(first + 4 * i)?))
            .collect()
    }

    /// The strings a vector field refers to.
    pub fn strings(&self, table: Table, slot: usize) -> Result<Vec<&'a [u8]>, ReadError> {
        let (first, count) = self.offset_vector(table, slot)?;
        (0..count as u64)
            .map(|i| self.vector(self.follow(first + 4 * i)?, 1))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_reads_back_what_was_written() {
        let mut b = Builder::default();
        let name = b.create_string(b"hello");
        let blob = b.create_byte_vector(&[1, 2, 3]);
        b.start_table(4);
        b.add_offset(0, name);
        b.add_i64(1, -7, 0);
        b.add_u32(2, 0, 0); // the default: not written
        b.add_offset(3, blob);
        let root = b.end_table();
        let buf = b.finish(root);
        let r = Reader::new(&buf);
        let t = r.root().unwrap();
        assert_eq!(r.bytes_field(t, 0).unwrap(), b"hello");
        assert_eq!(r.i64(t, 1, 0).unwrap(), -7);
        assert_eq!(r.u32(t, 2, 9).unwrap(), 9);
        assert_eq!(r.bytes_field(t, 3).unwrap(), &[1, 2, 3]);
        assert_eq!(r.i8(t, 7, 1).unwrap(), 1, "past the vtable: the default");
    }

    #[test]
    fn equal_tables_share_one_vtable() {
        let mut b = Builder::default();
        let mut tables = Vec::new();
        for i in 0..3 {
            b.start_table(2);
            b.add_u32(0, i + 1, 0);
            tables.push(b.end_table());
        }
        let list = b.create_offset_vector(&tables);
        b.start_table(1);
        b.add_offset(0, list);
        let root = b.end_table();
        let buf = b.finish(root);
        // Three 8-byte tables, one 8-byte vtable for them, the vector, the root.
        let r = Reader::new(&buf);
        let items = r.tables(r.root().unwrap(), 0).unwrap();
        let values: Vec<u32> = items.iter().map(|&t| r.u32(t, 0, 0).unwrap()).collect();
        assert_eq!(values, [1, 2, 3]);
        let vtables: std::collections::HashSet<usize> = items.iter().map(|t| t.vtable).collect();
        assert_eq!(vtables.len(), 1);
    }

    #[test]
    fn the_layout_is_the_go_runtimes() {
        // A table with one string field, as Go's builder lays it out (worked by hand:
        // root offset, vtable [6, 8, 4], table [soffset 6, offset 4], string "ab\0" + pad).
        let mut b = Builder::default();
        let s = b.create_string(b"ab");
        b.start_table(1);
        b.add_offset(0, s);
        let root = b.end_table();
        let buf = b.finish(root);
        assert_eq!(
            buf,
            [
                12, 0, 0, 0, // root: the table at 12
                0, 0, // padding to align the root offset
                6, 0, 8, 0, 4, 0, // vtable: 6 bytes, table of 8, field 0 at +4
                6, 0, 0, 0, // table: vtable 6 bytes before it
                4, 0, 0, 0, // field 0: the string 4 bytes on
                2, 0, 0, 0, b'a', b'b', 0, 0, // "ab", NUL, padding
            ]
        );
    }

    #[test]
    fn crafted_offsets_and_shared_strings_are_refused() {
        assert!(Reader::new(&[]).root().is_err());
        assert!(Reader::new(&[200, 0, 0, 0]).root().is_err());
        // One string referred to by every element of a vector is copied out once only.
        let mut b = Builder::default();
        let s = b.create_string(&[b'x'; 64]);
        b.prep(4, 4 * 100);
        for _ in 0..100 {
            b.prepend_offset(s);
        }
        let list = b.end_vector(100);
        b.start_table(1);
        b.add_offset(0, list);
        let root = b.end_table();
        let buf = b.finish(root);
        let r = Reader::new(&buf);
        assert_eq!(
            r.strings(r.root().unwrap(), 0).unwrap_err(),
            ReadError::SharedData
        );
    }
}
