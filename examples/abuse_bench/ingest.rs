//! `ingest`: collectors posting 1,000-event batches, 1 then 16 of them,
//! beside a reader at a fixed rate.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Bytes;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::client::{connect, p50_p99, paced, post_json, recs_path, send, Asker, ByRoute, Sender, Tally};
use crate::data::Prepared;
use crate::report::{verdict, Row};
use crate::slow::stop_after;
use crate::system::{cpu_seconds, thousands, warn_if_compiling};
use crate::{start_server, Args};

const SCENARIO: &str = "ingest";
const RATIO: f64 = 0.8;
/// Events per new shopper in a batch.
const EVENTS_PER_USER: usize = 10;
/// The reader's connections.
const READERS: usize = 4;

/// The reader: the popular list and a new ranking for a known user, alternately.
fn reader_asker(users: Arc<Vec<String>>) -> Asker {
    Arc::new(move |conn, k| {
        if k % 2 == 0 {
            ("/v1/popular?n=10".to_owned(), "GET /v1/popular")
        } else {
            let user = &users[(conn * 7919 + k as usize * 104_729) % users.len()];
            (recs_path(user, Some((conn, k))), "GET recommendations")
        }
    })
}

/// What one collector phase measured.
#[derive(Default)]
struct Ingested {
    /// Answers (2xx latencies are the batches'), failures.
    tally: Tally,
    accepted: u64,
    duplicates: u64,
    rejected: u64,
    /// 200 answers whose `accepted + duplicates + rejected` was not the batch.
    odd: u64,
}

impl Ingested {
    fn merge(&mut self, other: Ingested) {
        self.tally.merge(other.tally);
        self.accepted += other.accepted;
        self.duplicates += other.duplicates;
        self.rejected += other.rejected;
        self.odd += other.odd;
    }

    /// Answers other than 200, and requests with no answer.
    fn failed(&self) -> u64 {
        self.tally.non_2xx() + self.tally.transport_errors + self.tally.connect_errors
    }
}

pub async fn run(args: &Args, recd: &Path, prepared: &Prepared) -> anyhow::Result<Vec<Row>> {
    println!(
        "\n## ingest: 1 then {} collectors posting {}-event batches back to back ({} s each, new shoppers, unique event ids), beside a reader at {} requests/s ({READERS} connections: GET /v1/popular and recommendations, alternately); first the reader alone",
        args.collectors, args.batch, args.seconds, args.reader_rate
    );
    let mut server = start_server(args, recd, prepared, &[]).await?;
    let (addr, pid) = (server.addr, server.pid());
    let ask = reader_asker(prepared.users.clone());
    let warmup = Duration::from_secs_f64(args.warmup);
    let seconds = Duration::from_secs_f64(args.seconds);

    let mut phases: Vec<(usize, Ingested, ByRoute)> = Vec::new();
    for (phase, collectors) in [0, 1, args.collectors].into_iter().enumerate() {
        warn_if_compiling();
        let cpu = (cpu_seconds(pid)?, cpu_seconds(std::process::id())?);
        let stop = CancellationToken::new();
        let timer = stop_after(stop.clone(), warmup + seconds);
        let reader = tokio::spawn(paced(addr, READERS, args.reader_rate, ask.clone(), warmup, stop));
        let start = Instant::now() + warmup;
        let end = start + seconds;
        let tasks: Vec<_> = (0..collectors)
            .map(|c| {
                let items = prepared.items.clone();
                let batch = args.batch;
                tokio::spawn(collector(addr, phase, c, items, batch, start, end))
            })
            .collect();
        let mut ingested = Ingested::default();
        for task in tasks {
            ingested.merge(task.await?);
        }
        let reader = reader.await??;
        let (reads, measured) = (reader.routes, reader.seconds);
        timer.abort();
        ingested.tally = std::mem::take(&mut ingested.tally).finish();
        let wall = (warmup + seconds).as_secs_f64();
        let server_cores = (cpu_seconds(pid)? - cpu.0) / wall;
        let own_cores = (cpu_seconds(std::process::id())? - cpu.1) / wall;
        server.ensure_running(" during the ingest")?;

        println!(
            "{} collector(s): CPU server {:.2} cores, driver {:.2}",
            collectors, server_cores, own_cores
        );
        if collectors > 0 {
            let t = &ingested.tally;
            println!(
                "    POST /v1/events: {} batches answered 200, {} events accepted ({:.0}/s), {} duplicates, {} rejected, {} answers not adding up; batch latency p50 / p99 {} ms; not 200: {}",
                thousands(t.ok as f64),
                thousands(ingested.accepted as f64),
                ingested.accepted as f64 / args.seconds,
                ingested.duplicates,
                ingested.rejected,
                ingested.odd,
                p50_p99(t),
                t.failures()
            );
            t.print_examples("    ");
        }
        for (route, t) in &reads {
            println!(
                "    reader {route}: {} answered 2xx ({:.0}/s over {measured:.1} s), latency from the scheduled send p50 / p99 / max {} / {:.2} ms; failures: {}",
                thousands(t.ok as f64),
                t.ok as f64 / measured.max(1e-9),
                p50_p99(t),
                t.percentile(100.0),
                t.failures()
            );
            t.print_examples("    ");
        }
        phases.push((collectors, ingested, reads));
    }
    let log_row = crate::log_findings(SCENARIO, &server);
    server.stop()?;

    let rate = |i: usize| phases[i].1.accepted as f64 / args.seconds;
    let ratio = rate(2) / rate(1);
    let failed: u64 = phases.iter().map(|p| p.1.failed()).sum();
    let odd: u64 = phases.iter().map(|p| p.1.duplicates + p.1.rejected + p.1.odd).sum();
    // The reader's p99 over both routes together, per phase.
    let reader_p99 = |i: usize| {
        let mut all = Tally::default();
        for t in phases[i].2.values() {
            all.latencies_us.extend(&t.latencies_us);
        }
        all.finish().percentile(99.0)
    };
    let reader_failed: u64 = phases
        .iter()
        .flat_map(|p| p.2.values())
        .map(|t| t.non_2xx() + t.transport_errors + t.connect_errors)
        .sum();
    println!(
        "events/s: 1 collector {:.0}, {} collectors {:.0}, ratio {:.2} (target >= {RATIO}: {}); non-200 answers to POST /v1/events: {failed} ({}); reader p99 {:.2} ms alone, {:.2} beside 1 collector, {:.2} beside {}",
        rate(1),
        args.collectors,
        rate(2),
        ratio,
        verdict(ratio >= RATIO),
        verdict(failed == 0),
        reader_p99(0),
        reader_p99(1),
        reader_p99(2),
        args.collectors
    );
    Ok(vec![
        Row::info(
            SCENARIO,
            "events/s: 1 collector",
            format!(
                "{:.0} (batch p99 {:.1} ms)",
                rate(1),
                phases[1].1.tally.percentile(99.0)
            ),
        ),
        Row::info(
            SCENARIO,
            format!("events/s: {} collectors", args.collectors),
            format!(
                "{:.0} (batch p99 {:.1} ms)",
                rate(2),
                phases[2].1.tally.percentile(99.0)
            ),
        ),
        Row::target(
            SCENARIO,
            format!("events/s {} / 1", args.collectors),
            format!("{ratio:.2}"),
            format!("≥ {RATIO}"),
            ratio >= RATIO,
        ),
        Row::target(
            SCENARIO,
            "POST /v1/events answers not 200 (and events not accepted)",
            format!("{failed} ({odd})"),
            "0",
            failed == 0 && odd == 0,
        ),
        Row::info(
            SCENARIO,
            format!("reader p99 ms: alone → 1 collector → {} collectors", args.collectors),
            format!(
                "{:.2} → {:.2} → {:.2} (failures: {reader_failed})",
                reader_p99(0),
                reader_p99(1),
                reader_p99(2)
            ),
        ),
        log_row,
    ])
}

/// One collector: batches of `batch` events (new shoppers, `EVENTS_PER_USER`
/// views each, unique ids) posted back to back until `end`; counted when
/// begun at or after `start`.
async fn collector(
    addr: SocketAddr,
    phase: usize,
    c: usize,
    items: Arc<Vec<String>>,
    batch: usize,
    start: Instant,
    end: Instant,
) -> Ingested {
    let mut out = Ingested::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64((phase * 1000 + c) as u64);
    let mut sender: Option<Sender> = None;
    let mut b = 0u64;
    while Instant::now() < end {
        let mut s = match sender.take() {
            Some(s) => s,
            None => match connect(addr).await {
                Ok(s) => s,
                Err(e) => {
                    out.tally.connect_errors += 1;
                    out.tally.note(format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let body = batch_body(phase, c, b, batch, &items, &mut rng);
        b += 1;
        let began = Instant::now();
        let counted = began >= start;
        let answer = match tokio::time::timeout_at(end.into(), send(&mut s, post_json(addr, "/v1/events", body))).await
        {
            Ok(answer) => answer,
            Err(_) => break,
        };
        let latency = began.elapsed();
        match answer {
            Ok(answer) => {
                if !answer.close {
                    sender = Some(s);
                }
                if !counted {
                    continue;
                }
                out.tally.answer(&answer, latency, "POST /v1/events");
                if answer.status == 200 {
                    let reply: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
                    let accepted = reply["accepted"].as_u64().unwrap_or(0);
                    let duplicates = reply["duplicates"].as_u64().unwrap_or(0);
                    let rejected = reply["rejected"].as_array().map_or(0, |r| r.len() as u64);
                    out.accepted += accepted;
                    out.duplicates += duplicates;
                    out.rejected += rejected;
                    if accepted + duplicates + rejected != batch as u64 {
                        out.odd += 1;
                        let text = String::from_utf8_lossy(&answer.body[..answer.body.len().min(200)]).into_owned();
                        out.tally.note(format!("a 200 that does not add up to {batch}: {text}"));
                    }
                }
            }
            Err(e) => {
                if counted {
                    out.tally.transport_errors += 1;
                    out.tally.note(format!("POST /v1/events: {e}"));
                }
            }
        }
    }
    out
}

/// `{"events": [...]}`: `batch` views of random items by new shoppers
/// (`EVENTS_PER_USER` each), ids unique in the run, stamped a second apart
/// up to now.
fn batch_body(phase: usize, c: usize, b: u64, batch: usize, items: &[String], rng: &mut rand::rngs::StdRng) -> Bytes {
    let now = chrono::Utc::now();
    let mut body = String::with_capacity(batch * 160);
    body.push_str("{\"events\":[");
    for i in 0..batch {
        if i > 0 {
            body.push(',');
        }
        let user = i / EVENTS_PER_USER;
        let ts = now - chrono::Duration::seconds((EVENTS_PER_USER - i % EVENTS_PER_USER) as i64);
        let _ = write!(
            body,
            "{{\"event_id\":\"e{phase}-{c}-{b}-{i}\",\"user_id\":\"new{phase}-{c}-{b}-{user}\",\"item_id\":\"{}\",\"type\":\"view\",\"timestamp\":\"{}\"}}",
            items[rng.gen_range(0..items.len())],
            ts.format("%Y-%m-%dT%H:%M:%S%.3fZ")
        );
    }
    body.push_str("]}");
    Bytes::from(body)
}
