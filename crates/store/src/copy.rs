//! PostgreSQL's binary `COPY` format: the fastest way to hand the server
//! many rows (no SQL to parse, no text to convert).

use uuid::Uuid;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The rows of one `COPY … FROM STDIN (FORMAT binary)`.
#[derive(Debug)]
pub(crate) struct CopyRows {
    bytes: Vec<u8>,
}

impl CopyRows {
    pub(crate) fn with_capacity(bytes: usize) -> Self {
        let mut rows = Self { bytes: Vec::with_capacity(bytes + 21) };
        rows.bytes.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        rows.bytes.extend_from_slice(&0i32.to_be_bytes()); // flags
        rows.bytes.extend_from_slice(&0i32.to_be_bytes()); // header extension
        rows
    }

    /// Starts a row of `fields` fields.
    pub(crate) fn row(&mut self, fields: i16) {
        self.bytes.extend_from_slice(&fields.to_be_bytes());
    }

    fn field(&mut self, value: &[u8]) {
        self.bytes.extend_from_slice(&(value.len() as i32).to_be_bytes());
        self.bytes.extend_from_slice(value);
    }

    pub(crate) fn int4(&mut self, v: i32) {
        self.field(&v.to_be_bytes());
    }

    pub(crate) fn int8(&mut self, v: i64) {
        self.field(&v.to_be_bytes());
    }

    pub(crate) fn float8(&mut self, v: f64) {
        self.field(&v.to_bits().to_be_bytes());
    }

    pub(crate) fn text(&mut self, v: &str) {
        self.field(v.as_bytes());
    }

    pub(crate) fn uuid(&mut self, v: Uuid) {
        self.field(v.as_bytes());
    }

    pub(crate) fn optional_uuid(&mut self, v: Option<Uuid>) {
        match v {
            Some(v) => self.uuid(v),
            None => self.bytes.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }

    /// A `timestamptz` from milliseconds since the Unix epoch.
    pub(crate) fn timestamptz_ms(&mut self, ms: i64) {
        self.int8(ms.saturating_mul(1000) - POSTGRES_EPOCH_MICROS);
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.bytes.extend_from_slice(&(-1i16).to_be_bytes());
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_is_postgres_binary_copy() {
        let mut rows = CopyRows::with_capacity(0);
        rows.row(3);
        rows.int4(7);
        rows.optional_uuid(None);
        rows.timestamptz_ms(946_684_800_000 + 1);
        let bytes = rows.finish();
        assert_eq!(&bytes[..11], b"PGCOPY\n\xff\r\n\0");
        assert_eq!(&bytes[19..21], &3i16.to_be_bytes());
        assert_eq!(&bytes[21..29], &[0, 0, 0, 4, 0, 0, 0, 7]);
        assert_eq!(&bytes[29..33], &(-1i32).to_be_bytes());
        assert_eq!(&bytes[33..45], &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x03, 0xe8], "1 ms after 2000-01-01 is 1000 us");
        assert_eq!(&bytes[45..], &(-1i16).to_be_bytes());
    }
}
