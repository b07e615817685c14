//! Bounded binary reading and writing shared by every Cairn format.
//!
//! All integers are big-endian. A reader never allocates more than the bytes
//! it has actually been given: every declared length is checked against the
//! remaining input and against the field's own maximum before any copy.

use thiserror::Error;

/// Why a byte string could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("input ends early while reading {field}")]
    Truncated { field: &'static str },
    #[error("{field} declares {declared} bytes, more than its limit of {max}")]
    TooLong {
        field: &'static str,
        declared: u64,
        max: u64,
    },
    #[error("{field} is not valid UTF-8")]
    NotUtf8 { field: &'static str },
    #[error("{field} has the invalid value {value}")]
    InvalidValue { field: &'static str, value: u64 },
    #[error("{count} unexpected bytes after the end of the {what}")]
    TrailingBytes { what: &'static str, count: usize },
}

/// A cursor over untrusted bytes.
pub struct Reader<'a> {
    input: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(input: &'a [u8]) -> Self {
        Self { input }
    }

    pub fn remaining(&self) -> usize {
        self.input.len()
    }

    pub fn take(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if len > self.input.len() {
            return Err(DecodeError::Truncated { field });
        }
        let (head, tail) = self.input.split_at(len);
        self.input = tail;
        Ok(head)
    }

    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// A boolean byte: exactly 0 or 1, so that every value has one encoding.
    pub fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(DecodeError::InvalidValue {
                field,
                value: u64::from(other),
            }),
        }
    }

    /// Bytes with a u16 length prefix, at most `max` long.
    pub fn bytes16(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = usize::from(self.u16(field)?);
        if len > max {
            return Err(DecodeError::TooLong {
                field,
                declared: len as u64,
                max: max as u64,
            });
        }
        self.take(len, field)
    }

    /// Bytes with a u32 length prefix, at most `max` long.
    pub fn bytes32(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = self.u32(field)? as usize;
        if len > max {
            return Err(DecodeError::TooLong {
                field,
                declared: len as u64,
                max: max as u64,
            });
        }
        self.take(len, field)
    }

    /// A UTF-8 string with a u16 length prefix, at most `max` bytes long.
    pub fn str16(&mut self, field: &'static str, max: usize) -> Result<&'a str, DecodeError> {
        let bytes = self.bytes16(field, max)?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError::NotUtf8 { field })
    }

    /// A count prefix (u32) for `elem_min_bytes`-sized elements, checked
    /// against `max` and against what the remaining input could possibly hold.
    pub fn count(
        &mut self,
        field: &'static str,
        max: usize,
        elem_min_bytes: usize,
    ) -> Result<usize, DecodeError> {
        let declared = self.u32(field)? as usize;
        if declared > max {
            return Err(DecodeError::TooLong {
                field,
                declared: declared as u64,
                max: max as u64,
            });
        }
        if declared.saturating_mul(elem_min_bytes) > self.remaining() {
            return Err(DecodeError::Truncated { field });
        }
        Ok(declared)
    }

    pub fn finish(self, what: &'static str) -> Result<(), DecodeError> {
        if self.input.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                what,
                count: self.input.len(),
            })
        }
    }
}

/// Appends big-endian fields to a byte vector.
pub trait Writer {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
    fn put_bool(&mut self, v: bool);
    /// Writes a u16 length prefix then the bytes; the caller has bounded `v`.
    fn put_bytes16(&mut self, v: &[u8]);
    /// Writes a u32 length prefix then the bytes; the caller has bounded `v`.
    fn put_bytes32(&mut self, v: &[u8]);
}

impl Writer for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_bool(&mut self, v: bool) {
        self.push(u8::from(v));
    }
    fn put_bytes16(&mut self, v: &[u8]) {
        debug_assert!(v.len() <= usize::from(u16::MAX));
        self.put_u16(v.len() as u16);
        self.extend_from_slice(v);
    }
    fn put_bytes32(&mut self, v: &[u8]) {
        debug_assert!(v.len() <= u32::MAX as usize);
        self.put_u32(v.len() as u32);
        self.extend_from_slice(v);
    }
}

/// Lower-case hexadecimal, for identifiers in logs, paths and vectors.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

/// Parses hexadecimal (either case) into exactly `N` bytes.
pub fn from_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let raw = text.as_bytes();
    if raw.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in raw.chunks_exact(2).enumerate() {
        out[i] = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
    }
    Some(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_refuses_more_elements_than_bytes_remaining() {
        let mut input = Vec::new();
        input.put_u32(1_000_000);
        input.extend_from_slice(&[0u8; 31]);
        let mut r = Reader::new(&input);
        assert_eq!(
            r.count("ids", 2_000_000, 32),
            Err(DecodeError::Truncated { field: "ids" })
        );
    }

    #[test]
    fn hex_round_trips_and_rejects_bad_digits() {
        let bytes = [0x00, 0x7f, 0xab, 0xff];
        assert_eq!(to_hex(&bytes), "007fabff");
        assert_eq!(from_hex::<4>("007FABFF"), Some(bytes));
        assert_eq!(from_hex::<4>("007fabfg"), None);
        assert_eq!(from_hex::<4>("007fab"), None);
    }
}
