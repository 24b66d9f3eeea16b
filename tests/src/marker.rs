//! Parsing the `@@NVSTACK` markers the guest prints (see [`crate::guest`] for the protocol).

use crate::guest::MARKER;

/// One marker line.
#[derive(Debug, Clone, PartialEq)]
pub enum Marker {
    /// `/init` started; the guest's uptime in seconds.
    Boot {
        /// `/proc/uptime` when `/init` started.
        uptime_s: Option<f64>,
    },
    /// A step started.
    StepBegin(String),
    /// A step ended.
    StepEnd {
        /// The step.
        name: String,
        /// The guest's verdict.
        ok: bool,
        /// Its exit status.
        rc: i32,
        /// Indices of `expect_output` entries not found.
        missing: Vec<usize>,
        /// Indices of `reject_output` entries found.
        unwanted: Vec<usize>,
    },
    /// All steps ran (or one failed); the guest powers off.
    Done {
        /// Whether every step passed.
        ok: bool,
    },
    /// A marker printed by a step: `KEY=VALUE` pairs.
    User {
        /// The step that printed it.
        step: String,
        /// Its pairs, in order.
        pairs: Vec<(String, String)>,
    },
}

fn pairs(words: &[&str]) -> Vec<(String, String)> {
    words.iter().filter_map(|w| w.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn get<'a>(p: &'a [(String, String)], key: &str) -> Option<&'a str> {
    p.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn indices(v: Option<&str>) -> Option<Vec<usize>> {
    match v {
        None | Some("") => Some(Vec::new()),
        Some(s) => s.split(',').map(|x| x.parse().ok()).collect(),
    }
}

/// Parse one line; `None` if it is not a well-formed marker (echoes, noise).
pub fn parse(line: &str) -> Option<Marker> {
    let rest = line.trim_end_matches(['\r', '\n']).strip_prefix(MARKER)?.strip_prefix(' ')?;
    let words: Vec<&str> = rest.split_whitespace().collect();
    match words.first().copied()? {
        "boot" => Some(Marker::Boot { uptime_s: get(&pairs(&words[1..]), "uptime").and_then(|u| u.parse().ok()) }),
        "user" => {
            let p = pairs(&words[1..]);
            let step = get(&p, "step")?.to_string();
            let rest: Vec<(String, String)> = p.into_iter().skip_while(|(k, _)| k == "step").collect();
            Some(Marker::User { step, pairs: rest })
        }
        w if w.starts_with("done") => {
            let p = pairs(&words[1..]);
            Some(Marker::Done { ok: get(&p, "status")? == "ok" })
        }
        w if w.starts_with("step=") => {
            let name = w.strip_prefix("step=")?.to_string();
            match words.get(1).copied()? {
                "begin" => Some(Marker::StepBegin(name)),
                "end" => {
                    let p = pairs(&words[2..]);
                    Some(Marker::StepEnd {
                        name,
                        ok: get(&p, "status")? == "ok",
                        rc: get(&p, "rc")?.parse().ok()?,
                        missing: indices(get(&p, "missing"))?,
                        unwanted: indices(get(&p, "unwanted"))?,
                    })
                }
                _ => None,
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        assert_eq!(parse("@@NVSTACK boot uptime=12.34\r"), Some(Marker::Boot { uptime_s: Some(12.34) }));
        assert_eq!(parse("@@NVSTACK step=a-1 begin"), Some(Marker::StepBegin("a-1".into())));
        assert_eq!(
            parse("@@NVSTACK step=x end status=fail rc=3 missing=0,2 unwanted="),
            Some(Marker::StepEnd { name: "x".into(), ok: false, rc: 3, missing: vec![0, 2], unwanted: vec![] })
        );
        assert_eq!(parse("@@NVSTACK done status=ok"), Some(Marker::Done { ok: true }));
        assert_eq!(
            parse("@@NVSTACK user step=map phys=0x1000 len=4096"),
            Some(Marker::User {
                step: "map".into(),
                pairs: vec![("phys".into(), "0x1000".into()), ("len".into(), "4096".into())]
            })
        );
    }

    #[test]
    fn ignores_noise() {
        for l in [
            "",
            "hello",
            "ack phys",
            "x @@NVSTACK done status=ok",
            "@@NVSTACK",
            "@@NVSTACK step=a",
            "@@NVSTACK step=a end status=ok rc=x",
            "@@NVSTACK done",
            "@@NVSTACKdone status=ok",
        ] {
            assert_eq!(parse(l), None, "{l:?}");
        }
    }
}
