//! `foliovm ctl`: the API client for people (tables) and scripts (`--json`).

use crate::CtlCmd;
use serde_json::Value;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;
use vmm::api::client::{request, Reply};

const TIMEOUT: Duration = Duration::from_secs(30);

fn call(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Result<Reply, String> {
    let r = request(sock, method, path, body, TIMEOUT).map_err(|e| {
        let mut s = e.to_string();
        if let Some(c) = std::error::Error::source(&e) {
            s += &format!(": {c}");
        }
        s
    })?;
    if r.status >= 400 {
        return Err(r.fault().unwrap_or_else(|| format!("HTTP {}", r.status)));
    }
    Ok(r)
}

fn mib(v: &Value) -> String {
    v.as_u64()
        .map(|b| format!("{}M", b >> 20))
        .unwrap_or_else(|| "-".into())
}

/// The compact per-VM table of `ctl stats`.
fn stats_table(stats: &Value) -> String {
    let mut out = format!(
        "{:<12} {:<12} {:>5} {:>9} {:>9} {:>9} {:>9} {:>10}\n",
        "VM", "STATE", "VCPUS", "MEMORY", "RESIDENT", "IN 2M", "FAULTS", "P99 FAULT"
    );
    for v in stats["vms"].as_array().into_iter().flatten() {
        let m = &v["memory"];
        out += &format!(
            "{:<12} {:<12} {:>5} {:>9} {:>9} {:>9} {:>9} {:>10}\n",
            v["name"].as_str().unwrap_or("?"),
            v["state"].as_str().unwrap_or("?"),
            // A `Value` prints as JSON and ignores the width: a string pads.
            v["vcpus"].to_string(),
            mib(&v["mem_bytes"]),
            mib(&m["resident_bytes"]),
            mib(&m["resident_bytes_by_order"]["2M"]),
            m["faults"]["events"]
                .as_u64()
                .map(|x| x.to_string())
                .unwrap_or_else(|| "-".into()),
            m["faults"]["latency"]["p99_ns"]
                .as_u64()
                .map(|ns| format!("{:.0}us", ns as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
        );
    }
    let h = &stats["host"];
    if h.is_object() {
        out += &format!(
            "host: pool {} free {} (2M blocks: {}), metadata {:.2} B/guest page\n",
            mib(&h["pool_bytes"]),
            mib(&h["free_bytes"]),
            mib(&h["free_bytes_by_order"]["2M"]),
            h["metadata_bytes_per_guest_page"].as_f64().unwrap_or(0.0)
        );
    }
    out
}

fn state_path(vm: &Option<String>) -> String {
    match vm {
        Some(n) => format!("/vms/{n}"),
        None => "/vm".into(),
    }
}

fn run(sock: &Path, json: bool, cmd: CtlCmd) -> Result<(), String> {
    match cmd {
        CtlCmd::Stats { watch } => loop {
            let r = call(sock, "GET", "/stats", None)?;
            let text = if json {
                format!("{}\n", r.body)
            } else {
                stats_table(&r.json())
            };
            if watch && std::io::stdout().is_terminal() {
                // Clear the screen and home the cursor before each refresh.
                print!("\x1b[2J\x1b[H{text}");
            } else {
                print!("{text}");
            }
            let _ = std::io::stdout().flush();
            if !watch {
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs(1));
        },
        CtlCmd::Pause { vm } => {
            call(
                sock,
                "PATCH",
                &state_path(&vm),
                Some(r#"{"state": "Paused"}"#),
            )?;
            if !json {
                println!("paused {}", vm.as_deref().unwrap_or("the VM"));
            }
            Ok(())
        }
        CtlCmd::Limit {
            vm,
            min,
            max,
            priority,
        } => {
            let body = serde_json::json!({
                "mem_min_mib": mib_arg(&min)?,
                "mem_max_mib": max.as_deref().map(mib_arg).transpose()?,
                "priority": priority,
            });
            call(
                sock,
                "PUT",
                &format!("/vms/{vm}/limits"),
                Some(&body.to_string()),
            )?;
            if !json {
                println!(
                    "limits of {vm}: min {min}, max {}, priority {priority}",
                    max.as_deref().unwrap_or("none")
                );
            }
            Ok(())
        }
        CtlCmd::Reclaim { size, vm } => {
            let body = serde_json::json!({ "vm": vm, "mib": mib_arg(&size)?, "async": true });
            let result = follow(sock, &body.to_string(), "/reclaim", "reclaiming")?;
            if json {
                println!("{result}");
            } else {
                println!("reclaimed {}", mib(&result["reclaimed_bytes"]));
            }
            Ok(())
        }
        CtlCmd::Budget { size: None } => {
            let r = call(sock, "GET", "/budget", None)?;
            if json {
                println!("{}", r.body);
            } else {
                let v = r.json();
                println!(
                    "budget {} (at most {}), free {}",
                    mib(&v["budget_bytes"]),
                    mib(&v["max_budget_bytes"]),
                    mib(&v["free_bytes"])
                );
            }
            Ok(())
        }
        CtlCmd::Budget { size: Some(size) } => {
            // An operation: a lowering reclaims at disk speed, and the
            // API answers other requests meanwhile.
            let body = serde_json::json!({ "budget_mib": mib_arg(&size)?, "async": true });
            let v = follow(sock, &body.to_string(), "/budget", "setting the budget")?;
            if json {
                println!("{v}");
            } else {
                println!(
                    "budget {} (was {}), reclaimed {}",
                    mib(&v["budget_bytes"]),
                    mib(&v["previous_budget_bytes"]),
                    mib(&v["reclaimed_bytes"])
                );
            }
            Ok(())
        }
        CtlCmd::Balloon { vm, size } => {
            let path = match &vm {
                Some(n) => format!("/vms/{n}/balloon"),
                None => "/balloon".into(),
            };
            let name = vm.as_deref().unwrap_or("the VM");
            if let Some(size) = size {
                let body = serde_json::json!({ "amount_mib": mib_arg(&size)? });
                call(sock, "PATCH", &path, Some(&body.to_string()))?;
                if !json {
                    println!("balloon target of {name}: {size}");
                }
                return Ok(());
            }
            let r = call(sock, "GET", &path, None)?;
            if json {
                println!("{}", r.body);
            } else {
                let v = r.json();
                println!(
                    "balloon of {name}: target {} MiB, actual {} MiB, returned to the pool {}",
                    v["amount_mib"],
                    v["actual_mib"],
                    mib(&v["inflate_returned_bytes"])
                );
            }
            Ok(())
        }
        CtlCmd::Compact { vm } => {
            let result = follow(
                sock,
                r#"{"async": true}"#,
                &format!("/vms/{vm}/compact"),
                "compacting",
            )?;
            if json {
                println!("{result}");
            } else {
                println!(
                    "2M folios {} -> {}, free 2M blocks {} -> {}, {} folios migrated, {} ranges collapsed",
                    result["pmd_folios_before"],
                    result["pmd_folios_after"],
                    result["free_2m_blocks_before"],
                    result["free_2m_blocks_after"],
                    result["folios_migrated"],
                    result["collapsed"]
                );
            }
            Ok(())
        }
        CtlCmd::Relocate {
            vm,
            region,
            to_aligned,
            merge_with,
            grow,
        } => {
            let body = serde_json::json!({
                "region_gpa": gpa_arg(&region)?,
                "to_aligned": to_aligned,
                "merge_with_gpa": merge_with.as_deref().map(gpa_arg).transpose()?,
                "grow_mib": grow.as_deref().map(mib_arg).transpose()?,
            });
            let r = call(
                sock,
                "PUT",
                &format!("/vms/{vm}/relocate"),
                Some(&body.to_string()),
            )?;
            if json {
                println!("{}", r.body);
            } else {
                let v = r.json();
                println!(
                    "relocated to host {:#x}: pause {:.0}us ({:.0}us/GiB), {} tables, {} moved, {} 2M folios remapped as PMDs",
                    v["new"]["host_addr"].as_u64().unwrap_or(0),
                    v["pause_us"].as_f64().unwrap_or(0.0),
                    v["pause_us_per_gib"].as_f64().unwrap_or(0.0),
                    v["tables"],
                    mib(&v["moved_bytes"]),
                    v["remapped_huge"]
                );
            }
            Ok(())
        }
        CtlCmd::Resume { vm } => {
            call(
                sock,
                "PATCH",
                &state_path(&vm),
                Some(r#"{"state": "Resumed"}"#),
            )?;
            if !json {
                println!("resumed {}", vm.as_deref().unwrap_or("the VM"));
            }
            Ok(())
        }
    }
}

/// A guest-physical address: decimal or 0x-hex.
fn gpa_arg(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("invalid guest address {s:?}"))
}

/// Start a long operation with `PUT path` (the body asks for `"async":
/// true`) and follow it to its end: a progress bar when stdout is a
/// terminal, nothing in a pipe. Returns the operation's result.
fn follow(sock: &Path, body: &str, path: &str, what: &str) -> Result<Value, String> {
    let op = call(sock, "PUT", path, Some(body))?.json();
    let id = op["id"]
        .as_u64()
        .ok_or_else(|| format!("the API answered without an operation id: {op}"))?;
    let bar = std::io::stdout()
        .is_terminal()
        .then(|| progress_bar(&op, what));
    let mut op = op;
    loop {
        if let Some(b) = &bar {
            b.set_length(op["progress"]["total"].as_u64().unwrap_or(0));
            b.set_position(op["progress"]["done"].as_u64().unwrap_or(0));
        }
        match op["state"].as_str() {
            Some("running") => {}
            Some("succeeded") => {
                if let Some(b) = bar {
                    b.finish_and_clear();
                }
                return Ok(op["result"].clone());
            }
            _ => {
                if let Some(b) = bar {
                    b.abandon();
                }
                return Err(format!(
                    "operation {id} failed: {}",
                    op["error"].as_str().unwrap_or("no reason given")
                ));
            }
        }
        std::thread::sleep(POLL);
        op = call(sock, "GET", &format!("/operations/{id}"), None)?.json();
    }
}

/// How often `follow` asks for progress.
const POLL: Duration = Duration::from_millis(100);

fn progress_bar(op: &Value, what: &str) -> indicatif::ProgressBar {
    let bytes = op["progress"]["unit"] == "bytes";
    let template = if bytes {
        "{msg} [{bar:40}] {bytes}/{total_bytes} {elapsed}"
    } else {
        "{msg} [{bar:40}] {pos}/{len} {elapsed}"
    };
    let style = indicatif::ProgressStyle::with_template(template)
        .expect("a static template is valid")
        .progress_chars("=> ");
    indicatif::ProgressBar::with_draw_target(
        op["progress"]["total"].as_u64(),
        indicatif::ProgressDrawTarget::stdout(),
    )
    .with_style(style)
    .with_message(what.to_string())
}

/// A size the API takes in whole MiB; anything else is refused rather than
/// rounded, so what ctl reports is what the API was asked.
fn mib_arg(s: &str) -> Result<u64, String> {
    let b = vmm::config::parse_size(s).map_err(|e| e.to_string())?;
    if !b.is_multiple_of(1 << 20) {
        return Err(format!(
            "{s} is not a whole number of MiB (the API takes sizes in MiB)"
        ));
    }
    Ok(b >> 20)
}

/// Run a ctl command; returns the process exit status.
pub fn main(sock: &Path, json: bool, cmd: CtlCmd) -> i32 {
    match run(sock, json, cmd) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("foliovm ctl: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_are_whole_mib_or_refused() {
        assert_eq!(super::mib_arg("2G"), Ok(2048));
        assert_eq!(super::mib_arg("0"), Ok(0));
        let e = super::mib_arg("1500K").unwrap_err();
        assert!(e.contains("1500K is not a whole number of MiB"), "{e}");
        assert!(super::mib_arg("1K").is_err());
    }

    #[test]
    fn table_lists_each_vm() {
        let stats = serde_json::json!({
            "host": {"pool_bytes": 1u64 << 30, "free_bytes": 1u64 << 29,
                     "free_bytes_by_order": {"2M": 1u64 << 28}, "metadata_bytes_per_guest_page": 0.4},
            "vms": [{"name": "a", "state": "Running", "vcpus": 2, "mem_bytes": 1u64 << 30,
                     "memory": {"resident_bytes": 1u64 << 29, "resident_bytes_by_order": {"2M": 1u64 << 29},
                                "faults": {"events": 256, "latency": {"p99_ns": 90000}}}}]
        });
        let t = super::stats_table(&stats);
        assert!(t.contains("a            Running"), "{t}");
        // Every column lines up with its header, the vCPU count too.
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0].find("VCPUS").map(|i| i + 5),
            lines[1].find("2 ").map(|i| i + 1),
            "{t}"
        );
        assert_eq!(lines[0].len(), lines[1].len(), "{t}");
        assert!(t.contains("512M"), "{t}");
        assert!(t.contains("90us"), "{t}");
        assert!(
            t.contains("host: pool 1024M free 512M (2M blocks: 256M)"),
            "{t}"
        );
    }
}
