//! Who asked for an I/O: the numbers [`crate::IoDesc::client`] carries, and what they mean.
//!
//! One 16-bit space, split in two so that a number alone says which kind it is (a poison report names the first
//! dirtier of lost data by it):
//! - `1..=0x7fff`: an outside client. The NBD server numbers its connections so (and logs each number with the
//!   peer's address at accept), starting again from 1 after [`MAX_EXTERNAL`].
//! - `0x8000 | n`: internal I/O submitted on reactor `n` that named no client (`nvstack perf`, tests, the cache's own
//!   channels): what the cache records when a request says nothing.
//! - `0`: not said.

/// The highest outside client number.
pub const MAX_EXTERNAL: u16 = 0x7fff;

/// The bit marking an internal client.
pub const INTERNAL: u16 = 0x8000;

/// The client number of internal I/O submitted on reactor `reactor` (reactors above 0x7fff share the last number).
pub fn internal(reactor: usize) -> u16 {
    INTERNAL | u16::try_from(reactor).unwrap_or(MAX_EXTERNAL).min(MAX_EXTERNAL)
}

/// The outside client number after `n` (1 after 0 and after [`MAX_EXTERNAL`]).
pub fn next_external(n: u16) -> u16 {
    if n >= MAX_EXTERNAL {
        1
    } else {
        n + 1
    }
}

/// A client number in words: "NBD connection 3", "reactor 0 (internal I/O)", "none".
pub fn describe(client: u32) -> String {
    match u16::try_from(client) {
        Ok(0) => "none".into(),
        Ok(c) if c & INTERNAL != 0 => format!("reactor {} (internal I/O)", c & MAX_EXTERNAL),
        Ok(c) => format!("NBD connection {c}"),
        Err(_) => format!("unknown client {client}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_kinds_never_meet() {
        assert_eq!(internal(0), 0x8000);
        assert_eq!(internal(5), 0x8005);
        assert_eq!(internal(1 << 20), 0xffff, "huge reactor numbers saturate, never wrap into outside numbers");
        assert_eq!(next_external(0), 1);
        assert_eq!(next_external(41), 42);
        assert_eq!(next_external(MAX_EXTERNAL), 1, "wraps before the internal range");
        assert_eq!(describe(3), "NBD connection 3");
        assert_eq!(describe(u32::from(internal(2))), "reactor 2 (internal I/O)");
        assert_eq!(describe(0), "none");
        assert_eq!(describe(70000), "unknown client 70000");
    }
}
