//! A writer for the `newc` cpio format, the one the Linux kernel unpacks as an initramfs
//! (Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Each entry is a 110-byte ASCII header (`070701` then 13 eight-digit hex fields), the NUL-terminated name padded
//! to a multiple of 4 bytes, then the data padded to a multiple of 4 bytes. The archive ends with `TRAILER!!!`.

use std::io::{self, Write};

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// The magic of the `newc` format (no checksums).
const NEWC_MAGIC: &str = "070701";
/// Size of the ASCII header before the name.
pub const HEADER_LEN: usize = 110;

/// Writes a `newc` archive entry by entry. Call [`CpioWriter::finish`] to write the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

fn pad4(n: u64) -> usize {
    // (4 - n % 4) % 4 is at most 3.
    ((4 - n % 4) % 4) as usize
}

impl<W: Write> CpioWriter<W> {
    /// Start an archive on `out`.
    pub fn new(out: W) -> Self {
        CpioWriter { out, written: 0, next_ino: 1 }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn header(&mut self, name: &str, mode: u32, nlink: u32, size: u64, rdev: (u32, u32)) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        if name.is_empty() || name.as_bytes().contains(&0) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad cpio entry name {name:?}")));
        }
        let size32 = u32::try_from(size).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{name}: {size} bytes is too large for newc"))
        })?;
        let namesize = u32::try_from(name.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry name too long"))?;
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        let fields: [u32; 13] = [ino, mode, 0, 0, nlink, 0, size32, 0, 0, rdev.0, rdev.1, namesize, 0];
        let mut h = String::with_capacity(HEADER_LEN);
        h.push_str(NEWC_MAGIC);
        for f in fields {
            h.push_str(&format!("{f:08x}"));
        }
        debug_assert_eq!(h.len(), HEADER_LEN);
        self.put(h.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        let pad = pad4(self.written);
        self.put(&[0u8; 3][..pad])
    }

    fn data(&mut self, data: &[u8]) -> io::Result<()> {
        self.put(data)?;
        let pad = pad4(self.written);
        self.put(&[0u8; 3][..pad])
    }

    /// A directory with permission bits `perm` (e.g. 0o755).
    ///
    /// # Errors
    /// When writing fails or the name is empty.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.header(name, S_IFDIR | (perm & 0o7777), 2, 0, (0, 0))
    }

    /// A regular file with permission bits `perm` and contents `data`.
    ///
    /// # Errors
    /// When writing fails, the name is empty, or the file is 4 GiB or more.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.header(name, S_IFREG | (perm & 0o7777), 1, data.len() as u64, (0, 0))?;
        self.data(data)
    }

    /// A symbolic link `name` pointing at `target`.
    ///
    /// # Errors
    /// When writing fails or the name is empty.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.header(name, S_IFLNK | 0o777, 1, target.len() as u64, (0, 0))?;
        self.data(target.as_bytes())
    }

    /// A character device node.
    ///
    /// # Errors
    /// When writing fails or the name is empty.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.header(name, S_IFCHR | (perm & 0o7777), 1, 0, (major, minor))
    }

    /// Write the trailer and hand back the output.
    ///
    /// # Errors
    /// When writing fails.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 1, 0, (0, 0))?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, data, (rdev major, rdev minor)) of one entry.
    type Entry = (String, u32, Vec<u8>, (u32, u32));

    /// A minimal reader for the archives we write.
    fn parse(mut b: &[u8]) -> Vec<Entry> {
        let total = b.len();
        let mut out = Vec::new();
        loop {
            let off = total - b.len();
            assert_eq!(off % 4, 0, "entry at {off} not 4-aligned");
            assert_eq!(&b[..6], NEWC_MAGIC.as_bytes());
            let field =
                |i: usize| u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16).unwrap();
            let (mode, size, rmaj, rmin, namesize) =
                (field(1), field(6) as usize, field(9), field(10), field(11) as usize);
            let name = std::str::from_utf8(&b[HEADER_LEN..HEADER_LEN + namesize - 1]).unwrap().to_string();
            assert_eq!(b[HEADER_LEN + namesize - 1], 0);
            let data_start = (HEADER_LEN + namesize).div_ceil(4) * 4;
            let data = b[data_start..data_start + size].to_vec();
            b = &b[(data_start + size).div_ceil(4) * 4..];
            if name == "TRAILER!!!" {
                assert!(b.is_empty());
                return out;
            }
            out.push((name, mode, data, (rmaj, rmin)));
        }
    }

    #[test]
    fn round_trip_all_kinds_and_alignments() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/bin", 0o755).unwrap();
        w.file("/bin/a", 0o755, b"x").unwrap();
        w.file("bin/bb", 0o644, b"hello").unwrap();
        w.file("bin/ccc", 0o600, b"").unwrap();
        w.symlink("/bin/sh", "busybox").unwrap();
        w.char_dev("/dev/console", 0o600, 5, 1).unwrap();
        let bytes = w.finish().unwrap();
        let e = parse(&bytes);
        let names: Vec<&str> = e.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(names, ["bin", "bin/a", "bin/bb", "bin/ccc", "bin/sh", "dev/console"]);
        assert_eq!(e[0].1, S_IFDIR | 0o755);
        assert_eq!((e[1].1, e[1].2.as_slice()), (S_IFREG | 0o755, &b"x"[..]));
        assert_eq!(e[2].2, b"hello");
        assert!(e[3].2.is_empty());
        assert_eq!((e[4].1, e[4].2.as_slice()), (S_IFLNK | 0o777, &b"busybox"[..]));
        assert_eq!((e[5].1, e[5].3), (S_IFCHR | 0o600, (5, 1)));
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn system_cpio_reads_our_archive() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("etc", 0o755).unwrap();
        w.file("etc/hello", 0o644, b"hello world\n").unwrap();
        w.symlink("etc/link", "hello").unwrap();
        let bytes = w.finish().unwrap();
        let cpio = std::process::Command::new("cpio")
            .args(["-i", "-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn();
        let Ok(mut child) = cpio else {
            panic!("cpio(1) is needed for this test: install the Debian package cpio");
        };
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8(out.stdout).unwrap(), "etc\netc/hello\netc/link\n");
    }

    #[test]
    fn rejects_empty_names() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("/", 0o644, b"").is_err());
    }
}
