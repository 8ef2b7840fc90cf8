//! `overload`: recommendations from 64 connections, then a flood from
//! 3,000, then 64 again to see how soon the service is back.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::client::{closed_loop, metric, metrics, newcomers, p50_p99, recs_path, sample_peaks, Asker, Tally};
use crate::data::Prepared;
use crate::report::{verdict, Row};
use crate::system::{cpu_seconds, mb, rss_kb, thousands, warn_if_compiling};
use crate::tcp::Counters;
use crate::{start_server, Args};

const SCENARIO: &str = "overload";
/// The targets.
const GOODPUT_RATIO: f64 = 0.8;
const RECOVERY: Duration = Duration::from_secs(5);
/// Recovered: a 250 ms window at this share of the first phase's rate.
const RECOVERED_SHARE: f64 = 0.9;
const WINDOW: Duration = Duration::from_millis(250);

/// A new ranking for a random known user each time.
fn recs_asker(users: Arc<Vec<String>>) -> Asker {
    Arc::new(move |conn, k| {
        let user = &users[(conn * 7919 + k as usize * 104_729) % users.len()];
        (recs_path(user, Some((conn, k))), "GET recommendations")
    })
}

pub async fn run(args: &Args, recd: &Path, prepared: &Prepared) -> anyhow::Result<Vec<Row>> {
    println!(
        "\n## overload: GET recommendations (each a new ranking) from {} keep-alive connections, closed loop, {} s; then {} ({} per 100 ms), {} s; then {} again for {} s",
        args.connections,
        args.seconds,
        thousands(args.flood_connections as f64),
        args.wave,
        args.seconds,
        args.connections,
        args.recovery_seconds
    );
    let mut server = start_server(args, recd, prepared, &[]).await?;
    let (addr, pid) = (server.addr, server.pid());
    let ask = recs_asker(prepared.users.clone());
    let seconds = Duration::from_secs_f64(args.seconds);
    let warmup = Duration::from_secs_f64(args.warmup);

    // 1. The service at a load it can take.
    warn_if_compiling();
    let cpu = (cpu_seconds(pid)?, cpu_seconds(std::process::id())?);
    let start = Instant::now() + warmup;
    let end = start + seconds;
    let tasks: Vec<_> = (0..args.connections)
        .map(|conn| tokio::spawn(closed_loop(addr, conn, ask.clone(), start, end, None)))
        .collect();
    let mut normal = Tally::default();
    for task in tasks {
        normal.merge(task.await?);
    }
    let normal = normal.finish();
    let normal_rate = normal.ok as f64 / args.seconds;
    print_phase(
        &format!("{} connections", args.connections),
        &normal,
        args.seconds,
        cores(pid, cpu, (warmup + seconds).as_secs_f64())?,
    );
    let rss_before = rss_kb(pid)?.0;
    println!("    server RSS {}", mb(rss_before));

    // 2. The flood, opened in waves; its measured window starts once every
    // wave is out and a warm-up has passed. 3. The recovery load starts the
    // moment the flood stops.
    warn_if_compiling();
    let before = metrics(addr).await?;
    let counters = Counters::read();
    let cpu = (cpu_seconds(pid)?, cpu_seconds(std::process::id())?);
    let waves = args.flood_connections.div_ceil(args.wave);
    let began = Instant::now();
    let start = began + Duration::from_millis(100 * waves as u64) + warmup;
    let end = start + seconds;
    let recovery_end = end + Duration::from_secs_f64(args.recovery_seconds);
    let stop_sampling = CancellationToken::new();
    let peaks = sample_peaks(addr, pid, Duration::from_millis(100), stop_sampling.clone());
    // A liveness probe's view: /healthz is outside admission, not outside the flood.
    let probes = tokio::spawn(newcomers(addr, Duration::from_millis(100), stop_sampling.clone()));
    let mut flood_tasks = Vec::with_capacity(args.flood_connections);
    for wave in 0..waves {
        tokio::time::sleep_until((began + Duration::from_millis(100 * wave as u64)).into()).await;
        let first = wave * args.wave;
        for conn in first..(first + args.wave).min(args.flood_connections) {
            flood_tasks.push(tokio::spawn(closed_loop(addr, conn, ask.clone(), start, end, None)));
        }
    }
    let recovery_tasks: Vec<_> = (0..args.connections)
        .map(|i| {
            let ask = ask.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(end.into()).await;
                // Connection numbers of their own: no question repeats one of the flood's.
                closed_loop(addr, 1_000_000 + i, ask, end, recovery_end, Some(end)).await
            })
        })
        .collect();
    let mut flood = Tally::default();
    for task in flood_tasks {
        flood.merge(task.await?);
    }
    let flood = flood.finish();
    let flood_stopped = Instant::now();
    stop_sampling.cancel();
    let peaks = peaks.await?;
    let probes = probes.await??;
    let flood_cores = cores(pid, cpu, (end - began).as_secs_f64())?;
    let after_flood = metrics(addr).await?;
    let counters_after = Counters::read();
    let overflows = counters_after.grew(&counters, "ListenOverflows");
    let counters = counters_after.since(&counters);
    let mut recovery = Tally::default();
    for task in recovery_tasks {
        recovery.merge(task.await?);
    }
    let recovery = recovery.finish();
    server.ensure_running(" during the flood")?;
    let (_, hwm) = rss_kb(pid)?;

    let flood_rate = flood.ok as f64 / args.seconds;
    print_phase(
        &format!("{} connections", args.flood_connections),
        &flood,
        args.seconds,
        flood_cores,
    );
    let retry_after = flood.status(503) - flood.no_retry_after;
    let delta = |name: &str, labels: &str| metric(&after_flood, name, labels) - metric(&before, name, labels);
    println!(
        "    a new connection's GET /healthz every 100 ms during the flood: {} answered, p50 / p99 / max {} / {:.2} ms; failures: {}",
        probes.ok,
        p50_p99(&probes),
        probes.percentile(100.0),
        probes.failures()
    );
    probes.print_examples("    ");
    println!(
        "    admission (sampled every 100 ms): at most {} requests running (of max_concurrent_requests), {} queued",
        peaks.running, peaks.queued
    );
    println!(
        "    503s: {} ({} with Retry-After); server's shed counters: {} queue_full, {} queue_timeout; server's 503 answers to recommendations: {}",
        thousands(flood.status(503) as f64),
        thousands(retry_after as f64),
        delta("recd_requests_shed_total", "reason=\"queue_full\""),
        delta("recd_requests_shed_total", "reason=\"queue_timeout\""),
        delta("recd_http_requests_total", "status=\"503\"")
    );
    println!(
        "    server RSS peak during the flood {} (sampled every 100 ms; lifetime peak VmHWM {}); /metrics answered {} times (asked every 100 ms, one at a time); open connections at most {}; the flood's tasks had ended {:.2} s after its end; connections opened {}; kernel TCP counters (machine-wide): {counters}",
        mb(peaks.rss_kb),
        mb(hwm),
        peaks.samples,
        peaks.open_connections,
        (flood_stopped - end).as_secs_f64(),
        thousands(flood.connects as f64)
    );

    // Recovery: the end of the first window at 90% of the first phase's rate.
    let per_window = normal_rate * WINDOW.as_secs_f64();
    let windows = recovery
        .windows
        .len()
        .min((args.recovery_seconds / WINDOW.as_secs_f64()) as usize);
    let recovered = recovery.windows[..windows]
        .iter()
        .position(|&n| n as f64 >= RECOVERED_SHARE * per_window)
        .map(|w| WINDOW * (w as u32 + 1));
    let series: Vec<String> = recovery.windows[..windows.min(20)]
        .iter()
        .map(|&n| format!("{:.0}", n as f64 / WINDOW.as_secs_f64()))
        .collect();
    println!(
        "after the flood, {} connections: 2xx/s by 250 ms window: {}{}",
        args.connections,
        series.join(" "),
        if windows > 20 { " ..." } else { "" }
    );
    let recovery_rate = recovery.ok as f64 / args.recovery_seconds;
    println!(
        "    {} answered 2xx ({:.0}/s over {} s), p50 / p99 {:.2} / {:.2} ms; failures: {}",
        thousands(recovery.ok as f64),
        recovery_rate,
        args.recovery_seconds,
        recovery.percentile(50.0),
        recovery.percentile(99.0),
        recovery.failures()
    );
    recovery.print_examples("    ");
    let ratio = flood_rate / normal_rate;
    let ratio_ok = ratio >= GOODPUT_RATIO;
    let recovery_ok = recovered.is_some_and(|r| r <= RECOVERY);
    let recovery_text = match recovered {
        Some(r) => format!("{:.2} s", r.as_secs_f64()),
        None => format!("not within {} s", args.recovery_seconds),
    };
    println!(
        "goodput({})/goodput({}) = {:.2} (target >= {GOODPUT_RATIO}: {}); recovery {} (90% of {:.0}/s in a 250 ms window; target <= {:?}: {})",
        args.flood_connections,
        args.connections,
        ratio,
        verdict(ratio_ok),
        recovery_text,
        normal_rate,
        RECOVERY,
        verdict(recovery_ok)
    );
    let log_row = crate::log_findings(SCENARIO, &server);
    server.stop()?;

    Ok(vec![
        Row::info(
            SCENARIO,
            format!("goodput, p99 of 2xx: {} connections", args.connections),
            format!("{:.0}/s, {:.2} ms", normal_rate, normal.percentile(99.0)),
        ),
        Row::info(
            SCENARIO,
            format!(
                "goodput, p99 of 2xx: {} connections",
                thousands(args.flood_connections as f64)
            ),
            format!("{:.0}/s, {:.2} ms", flood_rate, flood.percentile(99.0)),
        ),
        Row::target(
            SCENARIO,
            format!(
                "goodput({}) / goodput({})",
                thousands(args.flood_connections as f64),
                args.connections
            ),
            format!("{ratio:.2}"),
            format!("≥ {GOODPUT_RATIO}"),
            ratio_ok,
        ),
        Row::info(
            SCENARIO,
            "flood: 503 (with Retry-After) / other non-2xx / transport errors / connect failures",
            format!(
                "{} ({}) / {} / {} / {} (kernel listen overflows: {overflows})",
                thousands(flood.status(503) as f64),
                thousands(retry_after as f64),
                flood.non_2xx() - flood.status(503),
                flood.transport_errors,
                flood.connect_errors
            ),
        ),
        Row::info(
            SCENARIO,
            "flood: a new connection's GET /healthz every 100 ms, p50 / p99 / max ms (failures)",
            format!(
                "{} / {:.2} ({})",
                p50_p99(&probes),
                probes.percentile(100.0),
                probes.non_2xx() + probes.transport_errors
            ),
        ),
        Row::info(
            SCENARIO,
            "flood: admission's requests running / queued, at most (sampled every 100 ms)",
            format!("{} / {}", peaks.running, peaks.queued),
        ),
        Row::info(
            SCENARIO,
            "server RSS: before → peak during the flood",
            format!("{} → {}", mb(rss_before), mb(peaks.rss_kb)),
        ),
        Row::info(
            SCENARIO,
            format!(
                "noise check: goodput of {} connections after the flood (its {} s), and the ratio to it",
                args.connections, args.recovery_seconds
            ),
            format!("{:.0}/s, {:.2}", recovery_rate, flood_rate / recovery_rate),
        ),
        Row::target(
            SCENARIO,
            "recovery to 90% of the 64-connection rate",
            recovery_text,
            format!("≤ {} s", RECOVERY.as_secs()),
            recovery_ok,
        ),
        log_row,
    ])
}

/// The server's and the driver's CPU, in cores, since `cpu` over `wall` s.
fn cores(pid: u32, cpu: (f64, f64), wall: f64) -> anyhow::Result<(f64, f64)> {
    Ok((
        (cpu_seconds(pid)? - cpu.0) / wall,
        (cpu_seconds(std::process::id())? - cpu.1) / wall,
    ))
}

fn print_phase(what: &str, tally: &Tally, seconds: f64, cores: (f64, f64)) {
    println!(
        "{what}: {} answered 2xx ({:.0}/s), 2xx latency p50 / p99 / max {:.2} / {:.2} / {:.2} ms; not 2xx: {}; CPU: server {:.2} cores, driver {:.2}",
        thousands(tally.ok as f64),
        tally.ok as f64 / seconds,
        tally.percentile(50.0),
        tally.percentile(99.0),
        tally.percentile(100.0),
        tally.failures(),
        cores.0,
        cores.1
    );
    tally.print_examples("    ");
}
