#![allow(dead_code)]

//! The fuzz input format: a sparse image. Byte 0: flags (bit 0: fix CRCs after applying the chunks, so that the
//! fuzzer reaches the checks behind them). Then chunks: offset in 512-byte sectors (be32), length (be16), bytes.
//! Everything not written by a chunk reads as zeros; the device is 2 GiB.

/// Device size the fuzz target presents.
pub const DEVICE_BYTES: u64 = 2 << 30;
/// The most bytes of one input the target looks at.
pub const MAX_INPUT_BYTES: usize = 1 << 20;

/// One chunk of a sparse image.
pub struct Chunk<'a> {
    /// Byte offset.
    pub offset: u64,
    /// Bytes.
    pub data: &'a [u8],
}

/// Split an input into flags and chunks (a truncated last chunk is cut to what is there).
pub fn parse(input: &[u8]) -> (u8, Vec<Chunk<'_>>) {
    let input = &input[..input.len().min(MAX_INPUT_BYTES)];
    let Some((&flags, mut rest)) = input.split_first() else { return (0, Vec::new()) };
    let mut chunks = Vec::new();
    while rest.len() >= 6 {
        let sector = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let len = usize::from(u16::from_be_bytes([rest[4], rest[5]]));
        let data = &rest[6..(6 + len).min(rest.len())];
        let offset = u64::from(sector) * 512;
        if offset + data.len() as u64 <= DEVICE_BYTES {
            chunks.push(Chunk { offset, data });
        }
        rest = &rest[(6 + len).min(rest.len())..];
    }
    (flags, chunks)
}

/// Encode chunks (for the seed generator).
pub fn encode(flags: u8, chunks: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![flags];
    for (offset, data) in chunks {
        for piece in data.chunks(u16::MAX as usize & !511) {
            let at = offset + (piece.as_ptr() as usize - data.as_ptr() as usize) as u64;
            out.extend_from_slice(&u32::try_from(at / 512).unwrap_or(u32::MAX).to_be_bytes());
            out.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            out.extend_from_slice(piece);
        }
    }
    out
}
