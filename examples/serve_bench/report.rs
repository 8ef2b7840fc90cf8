//! What is measured beside the load and printed: the server's counters
//! from `/metrics`, CPU and memory from /proc, the machine, each phase's
//! figures and the closing Markdown table.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;

use crate::load::{PhaseStats, Route};

/// One measured phase of one scenario.
pub struct Row {
    pub scenario: String,
    pub route: Route,
    pub stats: PhaseStats,
    pub rss_kb: u64,
    pub hwm_kb: u64,
}

/// Where a ranking's user state came from, as `recd_user_states_total`
/// labels it: cached (or warmed), a cached one advanced by new events, or
/// made from the user's events.
const STATE_SOURCES: [&str; 3] = ["cache", "advanced", "events"];

/// The server's `recd_user_states_total` for each of `STATE_SOURCES`.
pub async fn user_states(addr: SocketAddr) -> anyhow::Result<Vec<u64>> {
    let text = reqwest::get(format!("http://{addr}/metrics")).await?.text().await?;
    let count = |from: &str| {
        let prefix = format!("recd_user_states_total{{from=\"{from}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    Ok(STATE_SOURCES.iter().map(|from| count(from)).collect())
}

/// How many rankings a phase made (from the counters `before` and `after`
/// it), by where the user's state came from.
pub fn print_states(before: &[u64], after: &[u64]) {
    let made: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let total = made.iter().sum::<u64>().max(1) as f64;
    let parts: Vec<String> = STATE_SOURCES
        .iter()
        .zip(&made)
        .map(|(from, n)| format!("{} {from} ({:.1}%)", thousands(*n as f64), 100.0 * *n as f64 / total))
        .collect();
    println!(
        "    rankings made (warm-up included), by where the user's state came from: {}; the other answers repeated a ranking",
        parts.join(", ")
    );
}

pub fn print_phase(
    scenario: &str,
    route: Route,
    s: &PhaseStats,
    server_cores: f64,
    own_cores: f64,
    rss: u64,
    hwm: u64,
) {
    println!(
        "\n[{scenario}] {}: {} req/s (2xx) over {:.0} s; latency p50 {:.2} ms, p90 {:.2}, p99 {:.2}, max {:.2}",
        route.label(),
        thousands(s.rate()),
        s.elapsed,
        s.percentile(50.0),
        s.percentile(90.0),
        s.percentile(99.0),
        s.percentile(100.0)
    );
    println!(
        "    CPU: server {server_cores:.2} cores, load generator {own_cores:.2} cores; server RSS {} (peak {})",
        mb(rss),
        mb(hwm)
    );
    if route.is_recs() && s.ok > 0 {
        let personalized = s.strategies.get("personalized").copied().unwrap_or(0);
        let by: Vec<String> = s.strategies.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!(
            "    strategy: {:.1}% personalized ({})",
            100.0 * personalized as f64 / s.ok as f64,
            by.join(", ")
        );
    }
    if s.errors() > 0 {
        let by: Vec<String> = s.statuses.iter().map(|(k, v)| format!("{v} x {k}")).collect();
        println!(
            "    !!! {} ERRORS: non-2xx [{}], transport {}, bad JSON shape {} (sampled)",
            s.errors(),
            by.join(", "),
            s.transport_errors,
            s.bad_shape
        );
        for e in &s.examples {
            println!("    !!! {e}");
        }
    } else {
        println!("    errors: none");
    }
}

pub fn print_summary(rows: &[Row]) {
    println!("\n## Summary\n");
    println!("| scenario | route | req/s | p50 ms | p90 ms | p99 ms | max ms | errors | RSS MB (peak) |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        let s = &r.stats;
        println!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {} | {:.0} ({:.0}) |",
            r.scenario,
            match r.route {
                Route::Healthz => "`/healthz`",
                Route::Recs => "`/v1/users/{id}/recommendations?n=10`",
                Route::Fresh => "`/v1/users/{id}/recommendations?n=10&exclude_items=(new)`",
            },
            thousands(s.rate()),
            s.percentile(50.0),
            s.percentile(90.0),
            s.percentile(99.0),
            s.percentile(100.0),
            s.errors(),
            r.rss_kb as f64 / 1024.0,
            r.hwm_kb as f64 / 1024.0
        );
    }
    println!();
    let mut scenarios: Vec<&str> = rows.iter().map(|r| r.scenario.as_str()).collect();
    scenarios.dedup();
    for scenario in scenarios {
        let Some(health) = rows
            .iter()
            .find(|r| r.scenario == scenario && r.route == Route::Healthz)
        else {
            continue;
        };
        for recs in rows.iter().filter(|r| r.scenario == scenario && r.route.is_recs()) {
            let ratio = recs.stats.rate() / health.stats.rate();
            let p99 = recs.stats.percentile(99.0);
            let p99_target = if scenario.starts_with("synthetic") { 20.0 } else { 10.0 };
            let clean = recs.stats.errors() == 0;
            let verdict = |met: bool| match (met, clean) {
                (true, true) => "met",
                (true, false) => "NOT met: there were errors",
                (false, _) => "NOT met",
            };
            println!(
                "{scenario}, {}: at {:.1}% of the /healthz rate (target >= 20%: {}); p99 {p99:.2} ms (target < {p99_target} ms: {}); {} errors",
                match recs.route {
                    Route::Fresh => "recommendations with no ranking repeated",
                    _ => "recommendations",
                },
                100.0 * ratio,
                verdict(ratio >= 0.2),
                verdict(p99 < p99_target),
                recs.stats.errors()
            );
        }
    }
    println!(
        "\nLatency is measured at the client over a closed loop of keep-alive connections, so at saturation it is mostly \
         queueing (Little's law: connections / rate). The beauty model's training was capped at 60 s, which makes it \
         less accurate but not cheaper to serve: its shape (dim 64, hidden 64) is the default's."
    );
}

// ---------------------------------------------------------------------------
// /proc and the machine

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
