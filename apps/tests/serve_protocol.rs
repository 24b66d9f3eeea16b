//! Protocol-level checks with a minimal client: error codes for malformed requests, flush, FUA, write zeroes,
//! block status, and a disconnect for a broken stream.

mod serve_common;

use serve_common::*;

const READ: u16 = 0;
const WRITE: u16 = 1;
const DISC: u16 = 2;
const FLUSH: u16 = 3;
const TRIM: u16 = 4;
const CACHE: u16 = 5;
const WRITE_ZEROES: u16 = 6;
const BLOCK_STATUS: u16 = 7;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;

#[test]
fn malformed_requests_get_protocol_errors() {
    let s = Server::start("proto", &["--volume", "malloc:1M"]);
    for structured in [false, true] {
        let mut c = RawClient::connect(&s.nbd_sock, "disk0", structured);
        assert_eq!(c.size, 1 << 20);
        let size = c.size;
        // Read beyond the end: EINVAL. Write beyond the end: ENOSPC (payload consumed, connection stays usable).
        c.send(0, READ, 1, size - 512, 1024, &[]);
        assert_eq!(c.reply().0, EINVAL);
        c.send(0, WRITE, 2, size - 512, 1024, &[7u8; 1024]);
        let (e, h, _) = c.reply();
        assert_eq!((e, h), (ENOSPC, 2));
        // Offset overflow, misalignment, unknown command, unknown flag, flush with a range.
        c.send(0, READ, 3, u64::MAX - 100, 512, &[]);
        assert_eq!(c.reply().0, EINVAL);
        c.send(0, READ, 4, 1, 512, &[]);
        assert_eq!(c.reply().0, EINVAL);
        c.send(0, 42, 5, 0, 512, &[]);
        assert_eq!(c.reply().0, EINVAL);
        c.send(1 << 12, READ, 6, 0, 512, &[]);
        assert_eq!(c.reply().0, EINVAL);
        c.send(0, FLUSH, 7, 0, 512, &[]);
        assert_eq!(c.reply().0, EINVAL);
        // Too large: EINVAL, or EOVERFLOW with DF under structured replies.
        c.send(0, READ, 8, 0, 4 << 20, &[]);
        assert_eq!(c.reply().0, EINVAL);
        if structured {
            c.send(1 << 2, READ, 9, 0, 4 << 20, &[]);
            assert_eq!(c.reply().0, EOVERFLOW);
        }
        // Block status without a negotiated context: EINVAL.
        c.send(0, BLOCK_STATUS, 10, 0, 4096, &[]);
        assert_eq!(c.reply().0, EINVAL);
        // The connection still works: write with FUA, flush, read back, zero, trim, cache.
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        c.send(1, WRITE, 11, 4096, 8192, &data);
        assert_eq!(c.reply(), (0, 11, Vec::new()));
        c.send(0, FLUSH, 12, 0, 0, &[]);
        assert_eq!(c.reply(), (0, 12, Vec::new()));
        c.send(0, READ, 13, 4096, 8192, &[]);
        let (e, h, p) = c.reply();
        assert_eq!((e, h), (0, 13));
        let got = if structured { p[8..].to_vec() } else { read_payload(&mut c, 8192) };
        assert_eq!(got, data);
        c.send(0, WRITE_ZEROES, 14, 4096, 4096, &[]);
        assert_eq!(c.reply().0, 0);
        c.send(0, TRIM, 15, 65536, 4096, &[]);
        assert_eq!(c.reply().0, 0);
        c.send(0, CACHE, 16, 0, 65536, &[]);
        assert_eq!(c.reply().0, 0);
        c.send(0, READ, 17, 4096, 4096, &[]);
        let (e, _, p) = c.reply();
        assert_eq!(e, 0);
        let got = if structured { p[8..].to_vec() } else { read_payload(&mut c, 4096) };
        assert!(got.iter().all(|&b| b == 0), "write zeroes must read back as zeroes");
        c.send(0, DISC, 18, 0, 0, &[]);
        // A bad magic drops the connection (and only it).
        let mut bad = RawClient::connect(&s.nbd_sock, "disk0", structured);
        use std::io::{Read, Write};
        bad.s.write_all(&[0xde; 28]).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(bad.s.read(&mut b).unwrap_or(0), 0, "server must close a connection with a bad request magic");
    }
    assert!(s.stop().success());
}

fn read_payload(c: &mut RawClient, n: usize) -> Vec<u8> {
    use std::io::Read;
    let mut v = vec![0u8; n];
    c.s.read_exact(&mut v).unwrap();
    v
}
