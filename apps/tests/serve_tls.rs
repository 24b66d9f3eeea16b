//! `nvstack serve --tls-creds DIR` (NBD STARTTLS) against real clients: qemu-io and qemu-img with QEMU's
//! `tls-creds-x509` object, nbdinfo and nbdcopy (libnbd, `nbds://` URIs with `tls-certificates=DIR`). Credentials
//! (a CA, a server certificate for localhost/127.0.0.1, and an unrelated CA) are made at test time with openssl.
//! A missing tool fails the test with the package to install; nothing is skipped.
//!
//! Also: `nbdinfo --map` against a sparse file export (BLOCK_STATUS base:allocation with real holes).

mod serve_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serve_common::*;

const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = nvstack test CA
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[v3_srv]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[v3_cli]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// Credentials made with openssl: `server/` (qemu's server layout), `client/` (ca-cert.pem of the right CA),
/// `wrong/` (ca-cert.pem of another CA), `client_cert/` (the right CA plus client-cert.pem/client-key.pem signed
/// by it), `rogue_cert/` (the right CA plus a client certificate signed by the other CA).
struct Creds {
    server: PathBuf,
    client: PathBuf,
    wrong: PathBuf,
    client_cert: PathBuf,
    rogue_cert: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    run_ok(Command::new("openssl").current_dir(dir).args(args));
}

fn make_ca(dir: &Path, key: &str, cert: &str) {
    openssl(dir, &[
        "req", "-x509", "-config", "openssl.cnf", "-extensions", "v3_ca", "-newkey", "ec", "-pkeyopt",
        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert, "-days", "2",
    ]);
}

fn make_creds(base: &Path) -> Creds {
    need("openssl", "openssl");
    let d = base.join("pki");
    let c = Creds {
        server: d.join("server"),
        client: d.join("client"),
        wrong: d.join("wrong"),
        client_cert: d.join("client_cert"),
        rogue_cert: d.join("rogue_cert"),
    };
    for p in [&c.server, &c.client, &c.wrong, &c.client_cert, &c.rogue_cert] {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(d.join("openssl.cnf"), OPENSSL_CNF).unwrap();
    make_ca(&d, "ca-key.pem", "server/ca-cert.pem");
    openssl(&d, &[
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
        "server/server-key.pem", "-out", "server.csr", "-subj", "/CN=localhost",
    ]);
    openssl(&d, &[
        "x509", "-req", "-in", "server.csr", "-CA", "server/ca-cert.pem", "-CAkey", "ca-key.pem", "-set_serial", "2",
        "-days", "2", "-extfile", "openssl.cnf", "-extensions", "v3_srv", "-out", "server/server-cert.pem",
    ]);
    std::fs::copy(c.server.join("ca-cert.pem"), c.client.join("ca-cert.pem")).unwrap();
    make_ca(&d, "wrong-key.pem", "wrong/ca-cert.pem");
    for (dir, ca, ca_key) in [("client_cert", "server/ca-cert.pem", "ca-key.pem"), ("rogue_cert", "wrong/ca-cert.pem", "wrong-key.pem")] {
        std::fs::copy(c.server.join("ca-cert.pem"), d.join(dir).join("ca-cert.pem")).unwrap();
        let key = format!("{dir}/client-key.pem");
        let csr = format!("{dir}/client.csr");
        openssl(&d, &[
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", &key,
            "-out", &csr, "-subj", "/CN=nvstack test client",
        ]);
        openssl(&d, &[
            "x509", "-req", "-in", &csr, "-CA", ca, "-CAkey", ca_key, "-set_serial", "3", "-days", "2", "-extfile",
            "openssl.cnf", "-extensions", "v3_cli", "-out", &format!("{dir}/client-cert.pem"),
        ]);
    }
    c
}

fn tls_uri(s: &Server, export: &str, certs: &Path) -> String {
    format!("nbds://localhost:{}/{export}?tls-certificates={}", s.port.expect("tcp port"), certs.display())
}

/// qemu-io over TLS with the CA in `certs`; returns the raw output (the caller checks the status).
fn qemu_io_tls(s: &Server, certs: &Path, cmds: &[&str]) -> Output {
    let mut cmd = Command::new("qemu-io");
    cmd.arg("--object").arg(format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", certs.display()));
    for c in cmds {
        cmd.args(["-c", c]);
    }
    cmd.arg("--image-opts").arg(format!(
        "driver=nbd,host=127.0.0.1,port={},export=disk0,tls-creds=tls0",
        s.port.expect("tcp port")
    ));
    cmd.output().expect("run qemu-io")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

fn server_log(s: &Server) -> String {
    std::fs::read_to_string(s.dir.join("serve.log")).unwrap_or_default()
}

#[test]
fn qemu_io_and_nbdcopy_round_trip_over_tls() {
    need("qemu-io", "qemu-utils");
    need("nbdcopy", "libnbd-bin");
    need("nbdinfo", "libnbd-bin");
    let dir = tmpdir("tls-rt");
    let creds = make_creds(&dir);
    let s = Server::start_in(&dir, &["--volume-size", "64M", "--tls-creds", creds.server.to_str().unwrap()]);
    assert!(s.banner.contains("nbds://"), "banner shows the TLS URI: {}", s.banner);
    // Write patterns over TLS, read them back on a fresh TLS connection.
    let o = qemu_io_tls(&s, &creds.client, &["write -P 0x5a 0 1M", "write -P 0xa5 1M 64k", "write -P 0x11 4095k 1k", "flush"]);
    assert!(o.status.success() && !text(&o).contains("error"), "{}", text(&o));
    let o = qemu_io_tls(&s, &creds.client, &["read -P 0x5a 0 1M", "read -P 0xa5 1M 64k", "read -P 0x11 4095k 1k", "read -P 0 2M 64k"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains("Pattern verification failed") && !text(&o).contains("error"), "{}", text(&o));
    // TLS over the Unix socket too (the certificate is checked against tls-hostname there).
    let o = Command::new("qemu-io")
        .arg("--object")
        .arg(format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", creds.client.display()))
        .args(["-c", "read -P 0xa5 1M 64k", "--image-opts"])
        .arg(format!("driver=nbd,path={},export=disk0,tls-creds=tls0,tls-hostname=localhost", s.nbd_sock.display()))
        .output()
        .unwrap();
    assert!(o.status.success() && !text(&o).contains("Pattern verification failed"), "{}", text(&o));
    let unix_tls = format!(
        "nbds+unix:///disk0?socket={}&tls-certificates={}&tls-hostname=localhost",
        s.nbd_sock.display(),
        creds.client.display()
    );
    assert_eq!(run_ok(Command::new("nbdinfo").arg("--size").arg(&unix_tls)).trim(), (64u64 << 20).to_string());
    // libnbd sees a TLS connection with structured replies.
    let out = run_ok(Command::new("nbdinfo").arg("--json").arg(tls_uri(&s, "disk0", &creds.client)));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["TLS"], true, "{v}");
    assert_eq!(v["structured"], true, "{v}");
    assert_eq!(v["exports"][0]["export-size"], 64 << 20);
    // 24 MiB of pseudo-random data in and out with nbdcopy (several connections, many requests in flight: the
    // TLS send buffer fills and drains).
    let src = dir.join("src.img");
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut data = vec![0u8; 24 << 20];
    for c in data.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&src, &data).unwrap();
    let uri = tls_uri(&s, "disk0", &creds.client);
    run_ok(Command::new("nbdcopy").args(["--connections=4", "--requests=16"]).arg(&src).arg(&uri));
    let back = dir.join("back.img");
    run_ok(Command::new("nbdcopy").args(["--connections=4", "--requests=16"]).arg(&uri).arg(&back));
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), 64 << 20);
    assert!(got[..data.len()] == data[..], "data read back over TLS differs from what was written");
    assert!(server_log(&s).is_empty() || !server_log(&s).contains("panicked"));
    assert!(s.stop().success(), "SIGTERM must end serve with status 0");
}

#[test]
fn plaintext_clients_are_refused_with_a_clear_error() {
    need("qemu-io", "qemu-utils");
    need("nbdinfo", "libnbd-bin");
    let dir = tmpdir("tls-plain");
    let creds = make_creds(&dir);
    let s = Server::start_in(&dir, &["--volume-size", "16M", "--tls-creds", creds.server.to_str().unwrap()]);
    let t = Instant::now();
    let o = Command::new("qemu-io").args(["-f", "raw", "-c", "read 0 4k"]).arg(s.tcp_uri("disk0")).output().unwrap();
    assert!(!o.status.success(), "a plaintext qemu-io must fail: {}", text(&o));
    assert!(text(&o).contains("TLS negotiation required"), "qemu-io names the reason: {}", text(&o));
    assert!(text(&o).contains("this server requires TLS"), "the server's message reaches the user: {}", text(&o));
    let o = Command::new("nbdinfo").arg(s.tcp_uri("disk0")).output().unwrap();
    assert!(!o.status.success(), "a plaintext nbdinfo must fail: {}", text(&o));
    // The Unix socket is no back door.
    let o = Command::new("nbdinfo").arg(s.unix_uri("disk0")).output().unwrap();
    assert!(!o.status.success(), "plaintext over the Unix socket must fail too: {}", text(&o));
    assert!(t.elapsed() < Duration::from_secs(20), "refusals are prompt, not timeouts: {:?}", t.elapsed());
    // And TLS still works afterwards.
    run_ok(Command::new("nbdinfo").arg("--size").arg(tls_uri(&s, "disk0", &creds.client)));
    assert!(s.stop().success());
}

#[test]
fn wrong_ca_fails_cleanly_and_the_server_keeps_serving() {
    need("qemu-io", "qemu-utils");
    need("nbdinfo", "libnbd-bin");
    let dir = tmpdir("tls-ca");
    let creds = make_creds(&dir);
    let s = Server::start_in(&dir, &["--volume-size", "16M", "--tls-creds", creds.server.to_str().unwrap()]);
    // A client with the right CA before the failures.
    let good_before = qemu_io_tls(&s, &creds.client, &["write -P 0x77 0 64k"]);
    assert!(good_before.status.success(), "{}", text(&good_before));
    let t = Instant::now();
    let o = qemu_io_tls(&s, &creds.wrong, &["read 0 4k"]);
    assert!(!o.status.success(), "a client that does not trust the server's CA must fail: {}", text(&o));
    assert!(text(&o).to_lowercase().contains("certificate"), "the failure names the certificate: {}", text(&o));
    let o = Command::new("nbdinfo").arg(tls_uri(&s, "disk0", &creds.wrong)).output().unwrap();
    assert!(!o.status.success(), "nbdinfo with the wrong CA must fail: {}", text(&o));
    assert!(t.elapsed() < Duration::from_secs(20), "failures are prompt: {:?}", t.elapsed());
    // The server logged why, and serves the next client.
    let o = qemu_io_tls(&s, &creds.client, &["read -P 0x77 0 64k"]);
    assert!(o.status.success() && !text(&o).contains("Pattern verification failed"), "{}", text(&o));
    // The log reaches the file through a copying thread: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut log = server_log(&s);
    while !(log.contains("nbd: TLS") && log.contains("failed; closing this connection")) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        log = server_log(&s);
    }
    assert!(log.contains("nbd: TLS") && log.contains("failed; closing this connection"), "server log:\n{log}");
    assert!(s.stop().success());
}

#[test]
fn optional_tls_serves_both_and_bad_creds_are_refused_at_start() {
    need("nbdinfo", "libnbd-bin");
    let dir = tmpdir("tls-opt");
    let creds = make_creds(&dir);
    let s = Server::start_in(&dir, &[
        "--volume-size", "16M", "--tls-creds", creds.server.to_str().unwrap(), "--tls-mode", "optional",
    ]);
    let plain = run_ok(Command::new("nbdinfo").arg("--json").arg(s.tcp_uri("disk0")));
    let v: serde_json::Value = serde_json::from_str(&plain).unwrap();
    assert_eq!(v["TLS"], false);
    let tls = run_ok(Command::new("nbdinfo").arg("--json").arg(tls_uri(&s, "disk0", &creds.client)));
    let v: serde_json::Value = serde_json::from_str(&tls).unwrap();
    assert_eq!(v["TLS"], true);
    assert!(s.stop().success());
    // A directory without the server's key is refused with the file named, exit status 2.
    let out = Command::new(BIN)
        .args(["serve", "--port", "0", "--no-pin", "--data-dir"])
        .arg(dir.join("data2"))
        .arg("--tls-creds")
        .arg(&creds.client)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("server-cert.pem"), "{}", text(&out));
}

/// (offset, length, type) of `nbdinfo --map --json`.
fn map(uri: &str) -> Vec<(u64, u64, u64)> {
    let out = run_ok(Command::new("nbdinfo").args(["--map", "--json"]).arg(uri));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {out}"))
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["type"].as_u64().unwrap()))
        .collect()
}

fn type_at(m: &[(u64, u64, u64)], at: u64) -> u64 {
    m.iter().find(|e| e.0 <= at && at < e.0 + e.1).unwrap_or_else(|| panic!("no extent covers {at}: {m:?}")).2
}

#[test]
fn nbdinfo_map_shows_holes_and_data_of_a_sparse_file_export() {
    need("nbdinfo", "libnbd-bin");
    need("qemu-io", "qemu-utils");
    let dir = tmpdir("tls-map");
    let creds = make_creds(&dir);
    let s = Server::start_in(&dir, &[
        "--volume-size", "16M", "--tls-creds", creds.server.to_str().unwrap(), "--tls-mode", "optional",
    ]);
    let uri = s.unix_uri("disk0");
    // A fresh sparse volume: one hole that reads as zeroes (type 3 = hole|zero).
    let m = map(&uri);
    assert_eq!(m, vec![(0, 16 << 20, 3)], "fresh volume");
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "write -P 1 8M 4k"]).arg(&uri));
    for m in [map(&uri), map(&tls_uri(&s, "disk0", &creds.client))] {
        assert_eq!(m.iter().map(|e| e.1).sum::<u64>(), 16 << 20, "extents cover the export: {m:?}");
        assert_eq!(type_at(&m, 0), 3, "{m:?}");
        assert_eq!(type_at(&m, (1 << 20) - 4096), 3, "{m:?}");
        assert_eq!(type_at(&m, 1 << 20), 0, "written: data {m:?}");
        assert_eq!(type_at(&m, (1 << 20) + (60 << 10)), 0, "{m:?}");
        assert_eq!(type_at(&m, 4 << 20), 3, "{m:?}");
        assert_eq!(type_at(&m, 8 << 20), 0, "{m:?}");
        assert_eq!(type_at(&m, 12 << 20), 3, "{m:?}");
        assert!(m.len() >= 5, "several extents in the reply: {m:?}");
    }
    // qemu asks with NBD_CMD_FLAG_REQ_ONE (one extent per reply): the same picture through qemu-img map.
    let out = run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw"]).arg(&uri));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let data: Vec<(u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert!(data.iter().any(|&(o, l)| o <= 1 << 20 && (1 << 20) + (64 << 10) <= o + l), "qemu-img map: {out}");
    assert!(data.iter().any(|&(o, l)| o <= 8 << 20 && (8 << 20) < o + l), "qemu-img map: {out}");
    assert!(data.iter().map(|e| e.1).sum::<u64>() < 4 << 20, "holes are not data: {out}");
    // A discard punches the hole back.
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "discard 1M 64k"]).arg(&uri));
    let m = map(&uri);
    assert_eq!(type_at(&m, 1 << 20), 3, "discarded range is a hole again: {m:?}");
    assert!(s.stop().success());
}

#[test]
fn verify_peer_requires_a_client_certificate_signed_by_the_ca() {
    need("qemu-io", "qemu-utils");
    need("nbdinfo", "libnbd-bin");
    let dir = tmpdir("tls-peer");
    let creds = make_creds(&dir);
    let s = Server::start_in(&dir, &[
        "--volume-size", "16M", "--tls-creds", creds.server.to_str().unwrap(), "--tls-verify-peer",
    ]);
    // With a certificate from the CA: served (QEMU and libnbd both send client-cert.pem from their directory).
    let o = qemu_io_tls(&s, &creds.client_cert, &["write -P 0x42 0 64k", "read -P 0x42 0 64k"]);
    assert!(o.status.success() && !text(&o).contains("Pattern verification failed"), "{}", text(&o));
    run_ok(Command::new("nbdinfo").arg("--size").arg(tls_uri(&s, "disk0", &creds.client_cert)));
    // Without one, or with one from another CA: refused during the TLS handshake.
    for (certs, what) in [(&creds.client, "no client certificate"), (&creds.rogue_cert, "a certificate from another CA")] {
        let o = qemu_io_tls(&s, certs, &["read 0 4k"]);
        assert!(!o.status.success(), "qemu-io with {what} must fail: {}", text(&o));
        let o = Command::new("nbdinfo").arg("--size").arg(tls_uri(&s, "disk0", certs)).output().unwrap();
        assert!(!o.status.success(), "nbdinfo with {what} must fail: {}", text(&o));
    }
    // The server said why, and still serves good clients.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut log = server_log(&s);
    while !log.contains("handshake failed") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        log = server_log(&s);
    }
    assert!(log.contains("handshake failed") && log.to_lowercase().contains("certificate"), "server log:\n{log}");
    let o = qemu_io_tls(&s, &creds.client_cert, &["read -P 0x42 0 64k"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(s.stop().success());
}
