//! SPDK's JSON config format: `{"subsystems": [{"subsystem": "bdev", "config": [{"method", "params"}...]}...]}`.
//!
//! Entries of the subsystems nvstack knows (`bdev`, `nvstack_nbd`) are run through the RPC method table in order.
//! SPDK's tuning methods (`*_set_options`, `bdev_wait_for_examine`) and subsystems nvstack has no counterpart for
//! (`accel`, `sock`, `iobuf`, `vmd`, `scheduler`...) are skipped with a warning (as is `bdev_nvme_set_hotplug`:
//! nvstack attaches controllers only when asked), so SPDK users can bring their
//! files; any other method is an error that names it.

use serde_json::Value;

use super::rpc::methods::{call, Appliance, CONFIG_METHODS};
use crate::error::AppError;

fn bad(path: &str, what: String) -> AppError {
    AppError::Config { path: path.to_string(), reason: what }
}

/// Check the shape of a config and list its (subsystem, method, params) entries to run.
///
/// # Errors
/// [`AppError::Config`] naming the path and the entry at fault.
pub fn entries(path: &str, text: &str) -> Result<Vec<(String, String, Value)>, AppError> {
    let v: Value = serde_json::from_str(text).map_err(|e| bad(path, format!("not valid JSON: {e}")))?;
    let Some(subs) = v.get("subsystems").and_then(Value::as_array) else {
        return Err(bad(path, "expected an object with a \"subsystems\" array (SPDK JSON config format)".into()));
    };
    let mut out = Vec::new();
    for (i, s) in subs.iter().enumerate() {
        let Some(name) = s.get("subsystem").and_then(Value::as_str) else {
            return Err(bad(path, format!("subsystems[{i}] has no \"subsystem\" name")));
        };
        let config = match s.get("config") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(a)) => a,
            Some(_) => return Err(bad(path, format!("subsystem {name:?}: \"config\" must be an array"))),
        };
        let known = matches!(name, "bdev" | "nvstack_nbd");
        for (j, e) in config.iter().enumerate() {
            let Some(method) = e.get("method").and_then(Value::as_str) else {
                return Err(bad(path, format!("subsystem {name:?} entry {j}: no \"method\"")));
            };
            if !known {
                tracing::warn!(subsystem = name, method, "config: subsystem not supported by nvstack; entry skipped");
                continue;
            }
            if method.ends_with("_set_options") || method == "bdev_wait_for_examine" || method == "bdev_nvme_set_hotplug" {
                tracing::warn!(subsystem = name, method, "config: tuning method not supported by nvstack; skipped");
                continue;
            }
            if !CONFIG_METHODS.contains(&method) {
                return Err(bad(
                    path,
                    format!(
                        "subsystem {name:?} entry {j}: method {method:?} is not supported (supported: {})",
                        CONFIG_METHODS.join(", ")
                    ),
                ));
            }
            out.push((name.to_string(), method.to_string(), e.get("params").cloned().unwrap_or(Value::Null)));
        }
    }
    Ok(out)
}

/// Load a config file into the appliance.
///
/// # Errors
/// [`AppError::Config`] for an unreadable or malformed file, or a method that fails (with its message).
pub fn load(path: &str, app: &Appliance) -> Result<usize, AppError> {
    let text = std::fs::read_to_string(path).map_err(|e| bad(path, format!("cannot read: {e}")))?;
    let list = entries(path, &text)?;
    for (sub, method, params) in &list {
        call(app, method, Some(params.clone()))
            .map_err(|e| bad(path, format!("subsystem {sub:?} method {method:?} failed: {}", e.message)))?;
    }
    Ok(list.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked() {
        assert!(entries("x", "nope").is_err());
        assert!(entries("x", "{}").is_err());
        let e = entries("x", r#"{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_foo"}]}]}"#).unwrap_err();
        assert!(e.to_string().contains("x") && format!("{e:?}").contains("bdev_foo"));
        let ok = entries(
            "x",
            r#"{"subsystems":[{"subsystem":"accel","config":[{"method":"accel_x"}]},
                {"subsystem":"bdev","config":[{"method":"bdev_set_options","params":{}},
                {"method":"bdev_malloc_create","params":{"name":"M","num_blocks":8,"block_size":512}}]}]}"#,
        )
        .unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].1, "bdev_malloc_create");
    }
}
