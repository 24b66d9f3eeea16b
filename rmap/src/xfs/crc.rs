//! XFS metadata checksums: CRC32C (Castagnoli) of a whole buffer, computed as if its 4-byte CRC field were zero,
//! stored little-endian in that field.

/// Read a big-endian u16 at `off`; 0 when out of range (callers bound offsets by construction).
#[inline]
pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    off.checked_add(2)
        .and_then(|end| b.get(off..end))
        .and_then(|s| <[u8; 2]>::try_from(s).ok())
        .map_or(0, u16::from_be_bytes)
}

/// Read a big-endian u32 at `off`; 0 when out of range.
#[inline]
pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    off.checked_add(4)
        .and_then(|end| b.get(off..end))
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_be_bytes)
}

/// Read a big-endian u64 at `off`; 0 when out of range.
#[inline]
pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    off.checked_add(8)
        .and_then(|end| b.get(off..end))
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map_or(0, u64::from_be_bytes)
}

/// Read a little-endian u32 at `off`; 0 when out of range.
#[inline]
pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    off.checked_add(4)
        .and_then(|end| b.get(off..end))
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_le_bytes)
}

/// The CRC of `buf` with the four bytes at `crc_off` taken as zero. `None` if the field is not inside `buf`.
pub fn compute(buf: &[u8], crc_off: usize) -> Option<u32> {
    let field_end = crc_off.checked_add(4)?;
    let before = buf.get(..crc_off)?;
    let after = buf.get(field_end..)?;
    let crc = crc32c::crc32c(before);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    Some(crc32c::crc32c_append(crc, after))
}

/// The CRC stored in `buf` at `crc_off`, and the one computed over `buf`.
pub fn stored_and_computed(buf: &[u8], crc_off: usize) -> (u32, u32) {
    let stored = le32(buf, crc_off);
    // A field outside the buffer never matches: computed is then the complement of stored.
    let computed = compute(buf, crc_off).unwrap_or(!stored);
    (stored, computed)
}

/// Recompute and store the CRC of `buf` (for tests that corrupt a field and want only that field to be wrong).
/// Returns `false` if the field is not inside `buf`.
pub fn update(buf: &mut [u8], crc_off: usize) -> bool {
    let Some(crc) = compute(buf, crc_off) else { return false };
    match crc_off.checked_add(4).and_then(|end| buf.get_mut(crc_off..end)) {
        Some(field) => {
            field.copy_from_slice(&crc.to_le_bytes());
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_then_verify() {
        let mut b = vec![0xabu8; 512];
        assert!(update(&mut b, 224));
        let (s, c) = stored_and_computed(&b, 224);
        assert_eq!(s, c);
        b[3] ^= 1;
        let (s, c) = stored_and_computed(&b, 224);
        assert_ne!(s, c);
        assert!(!update(&mut b, 510));
        assert_eq!(be32(&b, 509), 0);
        assert_eq!(be64(&b, usize::MAX - 2), 0);
    }
}
