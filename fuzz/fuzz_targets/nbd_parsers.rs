//! cargo-fuzz target for nvstack serve's NBD parsers: the request header, option header, OPT_INFO/GO and
//! meta-context option data, the request checker, and the whole handshake state machine fed in random pieces.
//! The sources are included from apps/ (a binary crate cannot be a dependency).
//!
//!   RUSTC_BOOTSTRAP=1 cargo fuzz run nbd_parsers --sanitizer none -- -max_total_time=60
#![no_main]

// Top-level modules, so `super::proto` in handshake.rs resolves to this crate's `proto`.
#[allow(dead_code, unused_imports)]
#[path = "../../apps/src/serve/nbd/proto.rs"]
mod proto;
#[allow(dead_code, unused_imports)]
#[path = "../../apps/src/serve/nbd/handshake.rs"]
mod handshake;

use libfuzzer_sys::fuzz_target;
use handshake::{ExportDirectory, ExportInfo, Handshake, Outcome};
use proto::{tflag, BlockSizes, ExportLimits};

struct Dir;

fn limits() -> ExportLimits {
    ExportLimits {
        size_bytes: 1 << 30,
        block: BlockSizes { min: 512, preferred: 4096, max: 2 << 20 },
        tflags: tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_FUA | tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES
            | tflag::SEND_DF | tflag::SEND_CACHE | tflag::SEND_FAST_ZERO | tflag::CAN_MULTI_CONN,
    }
}

impl ExportDirectory for Dir {
    fn find(&self, name: &str) -> Option<ExportInfo> {
        (name.is_empty() || name == "disk0").then(|| ExportInfo {
            id: 1,
            name: "disk0".into(),
            description: "fuzz".into(),
            limits: limits(),
        })
    }
    fn list(&self) -> Vec<(String, String)> {
        vec![("disk0".into(), "fuzz".into())]
    }
    fn shutting_down(&self) -> bool {
        false
    }
}

fuzz_target!(|data: &[u8]| {
    // Cap the input explicitly (libFuzzer's default is larger than any one message we accept).
    let data = &data[..data.len().min(64 << 10)];
    let _ = proto::parse_option_header(data);
    let _ = proto::parse_info_request(data);
    let _ = proto::parse_meta_query(data);
    if let Ok(req) = proto::parse_request(data) {
        let l = limits();
        for (s, m) in [(false, false), (true, false), (true, true)] {
            if proto::check_request(&req, &l, s, m) == proto::Checked::Go
                && req.kind != proto::cmd::DISC
                && req.kind != proto::cmd::FLUSH
            {
                let end = req.offset.checked_add(u64::from(req.length));
                assert!(end.is_some_and(|e| e <= l.size_bytes), "accepted a request outside the export");
            }
        }
    }
    // The handshake, fed in pieces whose sizes come from the input itself.
    // TLS-required servers too (the first input byte picks): STARTTLS is where the handshake hands over.
    let mut h = if data.first().is_some_and(|b| b & 1 == 1) {
        Handshake::with_tls(handshake::TlsPolicy::Required)
    } else {
        Handshake::new()
    };
    let mut at = 0usize;
    let mut i = 0usize;
    while at < data.len() {
        let step = 1 + usize::from(data[i % data.len()]) % 64;
        i += 1;
        let end = (at + step).min(data.len());
        let (used, outcome) = h.feed(&data[at..end], &Dir);
        assert!(used <= end - at);
        h.output().clear();
        match outcome {
            Outcome::Continue => at += used,
            Outcome::Transmission(_) | Outcome::Close | Outcome::StartTls => break,
        }
        if used == 0 && end - at > 0 {
            break;
        }
    }
});
