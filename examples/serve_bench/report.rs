//! What is printed beside the load: the server's counters from `/metrics`,
//! each phase's figures and the closing Markdown table.

use std::net::SocketAddr;

use crate::load::{PhaseStats, Route};
use crate::system::{mb, thousands};

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
