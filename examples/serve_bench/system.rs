//! The process and the machine, from /proc: a process's memory and CPU, the
//! cores, a compile running beside the load, a stale binary; and the
//! number formats the reports share. (`scale_bench` uses this module too.)

use std::path::Path;

use anyhow::Context;

/// `VmRSS` and `VmHWM` of a process, kB.
pub fn rss_kb(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        Ok(line.split_whitespace().nth(1).context("no value")?.parse()?)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// User + system CPU seconds of a process (at Linux's usual 100 ticks/s).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after it do not.
    let rest = &stat[stat.rfind(')').context("odd /proc stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!("{cpus} cores available ({model}), shared by the server and the load generator")
}

/// A compile beside the load takes the cores the figures are about.
pub fn warn_if_compiling() {
    let busy = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("comm")).ok())
        .filter(|comm| comm.trim() == "rustc")
        .count();
    if busy > 0 {
        println!("!!! {busy} rustc process(es) running: the figures of this phase are not meaningful");
    }
}

/// A binary older than the sources measures old code.
pub fn warn_if_stale(recd: &Path, repo: &Path) {
    fn newest(dir: &Path) -> Option<std::time::SystemTime> {
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                if meta.is_dir() {
                    newest(&e.path())
                } else {
                    meta.modified().ok()
                }
            })
            .max()
    }
    let built = std::fs::metadata(recd).and_then(|m| m.modified()).ok();
    let sources = [repo.join("src"), repo.join("migrations"), repo.join("Cargo.toml")]
        .iter()
        .filter_map(|p| {
            if p.is_dir() {
                newest(p)
            } else {
                std::fs::metadata(p).and_then(|m| m.modified()).ok()
            }
        })
        .max();
    if let (Some(built), Some(sources)) = (built, sources) {
        if sources > built {
            println!(
                "!!! {} is older than the sources in {}: run `cargo build --release` first",
                recd.display(),
                repo.display()
            );
        }
    }
}

pub fn mb(kb: u64) -> String {
    format!("{:.0} MB", kb as f64 / 1024.0)
}

/// 12345.6 -> "12,346".
pub fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 && c != '-' {
            out.push(',');
        }
        out.push(c);
    }
    out
}
