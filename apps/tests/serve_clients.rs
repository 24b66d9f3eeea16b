//! `nvstack serve` against real NBD clients: nbdinfo, qemu-io, qemu-img, nbdcopy, fio (nbd engine), several
//! connections at once, and random bytes on live connections while a verified workload runs.
//! A missing client tool fails the test with the package to install; nothing is skipped.

mod serve_common;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use serve_common::*;

#[test]
fn nbdinfo_shows_size_block_sizes_and_flags() {
    need("nbdinfo", "libnbd-bin");
    let s = Server::start("info", &["--volume-size", "64M"]);
    assert!(s.banner.contains("nbdinfo nbd://127.0.0.1"), "banner says how to connect: {}", s.banner);
    for uri in [s.unix_uri("disk0"), s.tcp_uri("disk0")] {
        let out = run_ok(Command::new("nbdinfo").args(["--json", &uri]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let e = &v["exports"][0];
        assert_eq!(e["export-size"], 64 << 20);
        assert_eq!(e["block_size_minimum"], 512);
        assert_eq!(e["block_size_preferred"], 4096);
        assert_eq!(e["block_size_maximum"], 2 << 20);
        for f in ["can_flush", "can_fua", "can_multi_conn", "can_trim", "can_zero", "can_cache", "can_df"] {
            assert_eq!(e[f], true, "{f} in {e}");
        }
        assert_eq!(e["is_read_only"], false);
        assert_eq!(v["structured"], true);
        assert!(e["contexts"].to_string().contains("base:allocation"));
    }
    // The default volume is a sparse file in the data dir.
    let meta = std::fs::metadata(s.dir.join("disk0.img")).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(s.stop().success(), "SIGTERM must end serve with status 0");
}

#[test]
fn qemu_io_pattern_writes_and_reads() {
    need("qemu-io", "qemu-utils");
    let s = Server::start("qio", &["--volume-size", "64M"]);
    let uri = s.unix_uri("disk0");
    let out = run_ok(Command::new("qemu-io").args([
        "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 1M 64k", "-c", "write -P 0x11 4095k 1k",
        "-c", "flush", "-c", "write -z 2M 128k", "-c", "discard 3M 64k", "-c", "write -P 0x33 -f 5M 8k", &uri,
    ]));
    assert!(!out.contains("error") && !out.contains("failed"), "{out}");
    // A fresh connection sees everything (cross-connection consistency).
    let out = run_ok(Command::new("qemu-io").args([
        "-f", "raw", "-r", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0xa5 1M 64k", "-c", "read -P 0x11 4095k 1k",
        "-c", "read -P 0 2M 128k", "-c", "read -P 0x33 5M 8k", &uri,
    ]));
    assert!(!out.contains("Pattern verification failed") && !out.contains("error"), "{out}");
    // Beyond the end is refused, not truncated.
    let out = Command::new("qemu-io").args(["-f", "raw", "-c", "read 64M 4k", &uri]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Input/output error") || text.contains("out of bounds") || text.contains("Invalid"), "{text}");
    assert!(s.stop().success());
}

#[test]
fn qemu_img_convert_and_compare_256m_round_trip() {
    need("qemu-img", "qemu-utils");
    let s = Server::start("img", &["--volume-size", "256M"]);
    let src = s.dir.join("random.img");
    let mut f = std::fs::File::create(&src).unwrap();
    // 256 MiB of pseudo-random data (xorshift), with a few zero runs so sparse handling is exercised.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    for mib in 0..256 {
        if mib % 37 == 5 {
            buf.fill(0);
        } else {
            for c in buf.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
        }
        f.write_all(&buf).unwrap();
    }
    drop(f);
    let uri = s.tcp_uri("disk0");
    run_ok(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(&uri));
    let out = run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(&uri));
    assert!(out.contains("Images are identical"), "{out}");
    let back = s.dir.join("back.img");
    run_ok(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(&uri).arg(&back));
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&src).unwrap(), "round trip differs");
    assert!(s.stop().success());
}

#[test]
fn nbdcopy_both_directions_with_several_connections() {
    need("nbdcopy", "libnbd-bin");
    let s = Server::start("copy", &["--volume-size", "32M"]);
    let src = s.dir.join("src.img");
    let data: Vec<u8> = (0..32u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    run_ok(Command::new("nbdcopy").args(["--connections=4", "--flush"]).arg(&src).arg(s.unix_uri("disk0")));
    let dst = s.dir.join("dst.img");
    run_ok(Command::new("nbdcopy").args(["--connections=4"]).arg(s.tcp_uri("disk0")).arg(&dst));
    assert!(std::fs::read(&dst).unwrap() == data, "nbdcopy round trip differs");
    assert!(s.stop().success());
}

fn fio_job(uri: &str, name: &str, offset: &str, seconds: u32) -> Command {
    let mut c = Command::new("fio");
    c.args([
        &format!("--name={name}"), "--ioengine=nbd", &format!("--uri={uri}"), "--rw=randwrite", "--bs=4k",
        "--iodepth=16", "--size=8m", &format!("--offset={offset}"), "--verify=crc32c", "--verify_fatal=1",
        "--do_verify=1", "--verify_state_save=0", &format!("--runtime={seconds}"),
    ]);
    c
}

#[test]
fn fio_verify_on_several_connections_at_once() {
    need("fio", "fio");
    let s = Server::start("fio", &["--volume-size", "64M"]);
    let mut kids = Vec::new();
    for i in 0..4 {
        let uri = if i % 2 == 0 { s.unix_uri("disk0") } else { s.tcp_uri("disk0") };
        kids.push(fio_job(&uri, &format!("j{i}"), &format!("{}m", i * 16), 20).output().unwrap());
    }
    for o in kids {
        assert!(o.status.success(), "fio failed: {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains("err= 0"), "{text}");
    }
    assert!(s.stop().success());
}

#[test]
fn random_bytes_on_live_connections_do_not_disturb_a_verified_workload() {
    need("fio", "fio");
    let s = Server::start("fuzz", &["--volume-size", "64M"]);
    let uri = s.unix_uri("disk0");
    let fio = fio_job(&uri, "victim", "0", 30).stdout(std::process::Stdio::piped()).spawn().unwrap();
    // Let the victim connect before the noise starts.
    std::thread::sleep(Duration::from_millis(1500));
    let deadline = Instant::now() + Duration::from_secs(6);
    // Wait until the server has dropped a junk connection, so the noise never exhausts the connection limit.
    let wait_closed = |s: &mut std::os::unix::net::UnixStream| {
        use std::io::Read;
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut b = [0u8; 4096];
        while matches!(s.read(&mut b), Ok(n) if n > 0) {}
    };
    let mut x: u64 = 12345;
    let mut rnd = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let mut rounds = 0;
    while Instant::now() < deadline {
        // Garbage during the handshake.
        if let Ok(mut c) = std::os::unix::net::UnixStream::connect(&s.nbd_sock) {
            let _ = c.write_all(&rnd(200));
            let _ = c.shutdown(std::net::Shutdown::Write);
            wait_closed(&mut c);
        }
        // Garbage after a valid handshake (in transmission), with and without a valid request magic first.
        let mut c = RawClient::connect(&s.nbd_sock, "disk0", rounds % 2 == 0);
        let mut junk = rnd(4096);
        if rounds % 3 == 0 {
            junk[..4].copy_from_slice(&0x2560_9513u32.to_be_bytes());
        }
        let _ = c.s.write_all(&junk);
        let _ = c.s.shutdown(std::net::Shutdown::Write);
        wait_closed(&mut c.s);
        rounds += 1;
    }
    let out = fio.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("err= 0"), "victim workload failed:\n{text}");
    assert!(rounds > 5);
    // The server still answers.
    let v = s.rpc("spdk_get_version", serde_json::Value::Null);
    assert!(v["result"]["version"].as_str().unwrap().starts_with("nvstack"));
    assert!(s.stop().success());
}
