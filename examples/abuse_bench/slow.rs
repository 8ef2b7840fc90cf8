//! `slow`: connections that never finish a request head, idle or
//! trickling, against a short `header_read_timeout`, beside normal clients.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::client::{metric, metrics, newcomers, p50_p99, paced, recs_path, sample_peaks, Asker, PacedRun, Tally};
use crate::data::Prepared;
use crate::report::{verdict, Row};
use crate::system::{cpu_seconds, mb, thousands, warn_if_compiling};
use crate::tcp::{listen_backlog, sample_accept_queue, server_side_peers, Counters};
use crate::{start_server, Args};

const SCENARIO: &str = "slow";
/// A slow connection still open this long after the timeout and the
/// margin (and the waves) counts as never closed.
const GIVE_UP_AFTER: Duration = Duration::from_secs(5);
/// How often a new client connects beside the load.
const NEWCOMER_EVERY: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Connects and sends nothing.
    Idle,
    /// Sends a request line, then one header line a second, never the
    /// blank line that ends the head.
    Trickle,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Idle => "idle",
            Kind::Trickle => "trickling",
        }
    }
}

/// How a slow connection ended, seen from the client.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// The server closed it (end of stream), sending nothing.
    Closed,
    /// The server closed it after sending bytes (an answer).
    Answered,
    /// The connection was reset (or a write to it failed).
    Reset,
}

struct Outcome {
    kind: Kind,
    /// When the connect began, and the error if it failed.
    connect_failed: Option<String>,
    /// Connected at.
    connected: Option<Instant>,
    /// Closed at, and how; `None`: still open when the driver gave up.
    closed: Option<(Instant, End)>,
    /// The client's port, to find the server's side of it.
    port: u16,
    /// A connection still open when the driver gave up, kept open until the
    /// server's side of it is looked for.
    stream: Option<TcpStream>,
}

/// The normal clients' requests: `/healthz` and a new ranking for a random
/// known user, alternately.
fn normal_asker(users: Arc<Vec<String>>) -> Asker {
    Arc::new(move |conn, k| {
        if k % 2 == 0 {
            ("/healthz".to_owned(), "GET /healthz")
        } else {
            let user = &users[(conn * 7919 + k as usize * 104_729) % users.len()];
            (recs_path(user, Some((conn, k))), "GET recommendations")
        }
    })
}

pub async fn run(args: &Args, recd: &Path, prepared: &Prepared) -> anyhow::Result<Vec<Row>> {
    let timeout = Duration::from_secs_f64(args.header_timeout);
    let margin = Duration::from_secs_f64(args.margin);
    println!(
        "\n## slow: {} connections that never finish a head (half idle, half trickling a header line a second), {} per 100 ms, header_read_timeout {:?}; beside {} keep-alive connections at {} requests/s (half /healthz, half recommendations)",
        thousands(args.slow_connections as f64),
        args.wave,
        timeout,
        args.normal_connections,
        args.normal_rate
    );
    let setting = format!("RECD_HEADER_READ_TIMEOUT={}ms", timeout.as_millis());
    let mut server = start_server(args, recd, prepared, &[setting]).await?;
    let addr = server.addr;
    let ask = normal_asker(prepared.users.clone());

    let warmup = Duration::from_secs_f64(args.warmup);

    // The baseline: the normal clients alone, and new clients arriving.
    warn_if_compiling();
    let stop = CancellationToken::new();
    let timer = stop_after(stop.clone(), warmup + Duration::from_secs_f64(args.seconds));
    let probes = tokio::spawn(newcomers(addr, NEWCOMER_EVERY, stop.clone()));
    let baseline = paced(
        addr,
        args.normal_connections,
        args.normal_rate,
        ask.clone(),
        warmup,
        stop,
    )
    .await?;
    let baseline_new = probes.await??;
    timer.abort();
    print_normal("baseline, normal clients alone", &baseline, &baseline_new);

    // The slow clients, the normal ones beside them until every slow one
    // has ended.
    warn_if_compiling();
    let before = metrics(addr).await?;
    let counters = Counters::read();
    let (server_cpu, own_cpu) = (cpu_seconds(server.pid())?, cpu_seconds(std::process::id())?);
    let stop = CancellationToken::new();
    let normal = tokio::spawn(paced(
        addr,
        args.normal_connections,
        args.normal_rate,
        ask,
        Duration::ZERO,
        stop.clone(),
    ));
    // The normal connections are open before the first wave.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let probes = tokio::spawn(newcomers(addr, NEWCOMER_EVERY, stop.clone()));
    let peaks = sample_peaks(addr, server.pid(), Duration::from_millis(250), stop.clone());
    // The accept queue matters while the waves come.
    let stop_queue = CancellationToken::new();
    let queue = sample_accept_queue(addr.port(), Duration::from_millis(10), stop_queue.clone());
    let began = Instant::now();
    let waves = args.slow_connections.div_ceil(args.wave);
    let give_up = began + Duration::from_millis(100 * waves as u64) + timeout + margin + GIVE_UP_AFTER;
    let mut tasks = Vec::with_capacity(args.slow_connections);
    for wave in 0..waves {
        let wave_start = began + Duration::from_millis(100 * wave as u64);
        tokio::time::sleep_until(wave_start.into()).await;
        let first = wave * args.wave;
        for i in first..(first + args.wave).min(args.slow_connections) {
            let kind = if i % 2 == 0 { Kind::Idle } else { Kind::Trickle };
            tasks.push(tokio::spawn(slow_client(addr, kind, give_up)));
        }
    }
    let opened_in = began.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_queue.cancel();
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(task.await?);
    }
    let all_ended = began.elapsed();
    // Of the connections never closed: does the server hold a socket for them?
    let peers = server_side_peers(addr.port());
    let (mut held, mut unseen) = (0u64, 0u64);
    for o in outcomes.iter_mut() {
        if o.stream.take().is_some() {
            if peers.contains(&o.port) {
                held += 1;
            } else {
                unseen += 1;
            }
        }
    }
    let counters_after = Counters::read();
    let overflows = counters_after.grew(&counters, "ListenOverflows");
    let counters = counters_after.since(&counters);
    stop.cancel();
    let beside = normal.await??;
    let beside_new = probes.await??;
    let peaks = peaks.await?;
    let longest_queue = queue.await?;
    let backlog = listen_backlog(addr.port()).map_or_else(|| "unknown (no ss)".to_owned(), |b| b.to_string());
    let wall = began.elapsed().as_secs_f64();
    let server_cores = (cpu_seconds(server.pid())? - server_cpu) / wall;
    let own_cores = (cpu_seconds(std::process::id())? - own_cpu) / wall;
    server.ensure_running(" during the slow clients")?;
    let after = metrics(addr).await?;

    println!(
        "slow connections opened in {:.1} s (waves), the last ended {:.1} s after the first connect",
        opened_in.as_secs_f64(),
        all_ended.as_secs_f64()
    );
    let mut total = Summary::default();
    for kind in [Kind::Idle, Kind::Trickle] {
        let summary = Summary::of(outcomes.iter().filter(|o| o.kind == kind), timeout + margin);
        summary.print(kind.label(), timeout + margin);
        total.add(&summary);
    }
    let last_close = outcomes
        .iter()
        .filter_map(|o| o.closed.map(|(at, _)| at - began))
        .max()
        .unwrap_or_default();
    let delta = |name: &str, labels: &str| metric(&after, name, labels) - metric(&before, name, labels);
    println!(
        "server: {} connections closed for header_timeout, {} for another error, {} accept errors (from /metrics); open connections at most {} (sampled every 250 ms), {} after; RSS peak {} (sampled); CPU: server {:.2} cores, driver {:.2}",
        delta("recd_http_connections_closed_total", "reason=\"header_timeout\""),
        delta("recd_http_connections_closed_total", "reason=\"error\""),
        delta("recd_http_accept_errors_total", ""),
        peaks.open_connections,
        metric(&after, "recd_http_connections_open", ""),
        mb(peaks.rss_kb),
        server_cores,
        own_cores
    );
    println!(
        "    of those never closed: {held} have a server-side socket (open on the server: a defect), {unseen} have none (the server never saw them: their handshake's last ACK was dropped)"
    );
    println!(
        "    listen queue: at most {longest_queue} waiting to be accepted (sampled every 10 ms during the waves and 1 s after), listen backlog {backlog}; kernel TCP counters (machine-wide) during the phase: {counters}"
    );
    print_normal("normal clients beside the slow ones", &beside, &beside_new);
    let log_row = crate::log_findings(SCENARIO, &server);
    server.stop()?;

    let opened = total.opened;
    let in_time_ok = total.in_time == opened && opened > 0;
    let mut rows = vec![
        Row::target(
            SCENARIO,
            format!(
                "slow connections closed by the server within {}s + {}s of connecting",
                args.header_timeout, args.margin
            ),
            format!(
                "{} of {} opened (later: {}, never: {}, of which {unseen} the server never saw)",
                thousands(total.in_time as f64),
                thousands(opened as f64),
                total.late,
                total.never
            ),
            "all",
            in_time_ok,
        ),
        Row::target(
            SCENARIO,
            "slow connections never closed that the server holds a socket for",
            held.to_string(),
            "0",
            held == 0,
        ),
        Row::info(
            SCENARIO,
            "listen backlog; accept queue at most (every 10 ms); kernel listen overflows (machine-wide)",
            format!("{backlog}; {longest_queue}; {overflows}"),
        ),
        Row::target(
            SCENARIO,
            "slow connections that could not connect",
            format!(
                "{} of {}",
                total.connect_failed,
                thousands(args.slow_connections as f64)
            ),
            "0",
            total.connect_failed == 0,
        ),
        Row::info(
            SCENARIO,
            "until every slow connection was closed",
            format!(
                "{:.1} s after the first connect (waves over {:.1} s); each closed {} s after its connect (min / p50 / max)",
                last_close.as_secs_f64(),
                opened_in.as_secs_f64(),
                total.close_spread()
            ),
        ),
    ];
    for route in ["GET /healthz", "GET recommendations"] {
        let (a, b) = (
            baseline.routes.get(route).map(p50_p99).unwrap_or_default(),
            beside.routes.get(route).map(p50_p99).unwrap_or_default(),
        );
        rows.push(Row::info(
            SCENARIO,
            format!("{route} p50 / p99 ms: alone → beside the slow clients"),
            format!("{a} → {b}"),
        ));
    }
    rows.push(Row::info(
        SCENARIO,
        "a new connection's GET /healthz, p50 / p99 / max ms: alone → beside the slow clients",
        format!(
            "{} / {:.2} → {} / {:.2}",
            p50_p99(&baseline_new),
            baseline_new.percentile(100.0),
            p50_p99(&beside_new),
            beside_new.percentile(100.0)
        ),
    ));
    let failed: u64 = [&baseline.routes, &beside.routes]
        .iter()
        .flat_map(|routes| routes.values())
        .chain([&baseline_new, &beside_new])
        .map(|t| t.non_2xx() + t.transport_errors + t.connect_errors)
        .sum();
    rows.push(Row::target(
        SCENARIO,
        "normal and new-connection requests not answered 2xx (both phases)",
        failed.to_string(),
        "0",
        failed == 0,
    ));
    println!(
        "slow: closed in time {}; connect failures {}; normal requests failed {}",
        verdict(in_time_ok),
        total.connect_failed,
        failed
    );
    rows.push(log_row);
    Ok(rows)
}

/// Cancels `stop` after `after`.
pub fn stop_after(stop: CancellationToken, after: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        stop.cancel();
    })
}

fn print_normal(what: &str, run: &PacedRun, new: &Tally) {
    println!(
        "{what} ({:.1} s measured; {} connections opened for {} clients):",
        run.seconds, run.connects, run.clients
    );
    for (route, tally) in &run.routes {
        println!(
            "    {route}: {} answered 2xx ({:.0}/s), latency from the scheduled send p50 / p99 / max {} / {:.2} ms (the slowest answered {:.2} s into the phase); failures: {}",
            thousands(tally.ok as f64),
            tally.ok as f64 / run.seconds.max(1e-9),
            p50_p99(tally),
            tally.percentile(100.0),
            tally
                .worst
                .map_or(f64::NAN, |(_, at)| at.saturating_duration_since(run.began).as_secs_f64()),
            tally.failures()
        );
        tally.print_examples("    ");
    }
    let slower = new.latencies_us.iter().filter(|&&us| us >= 1_000_000).count();
    println!(
        "    new connections (one every {NEWCOMER_EVERY:?}, connect + GET /healthz): {} answered, p50 / p99 / max {} / {:.2} ms, {slower} took 1 s or more; failures: {}",
        new.ok,
        p50_p99(new),
        new.percentile(100.0),
        new.failures()
    );
    new.print_examples("    ");
}

/// The slow connections of one kind (or all), counted.
#[derive(Default)]
struct Summary {
    opened: u64,
    connect_failed: u64,
    in_time: u64,
    late: u64,
    never: u64,
    ends: [u64; 3],
    /// Seconds from connect to close, sorted.
    close_after: Vec<f64>,
    failures: Vec<String>,
}

impl Summary {
    fn of<'a>(outcomes: impl Iterator<Item = &'a Outcome>, in_time: Duration) -> Summary {
        let mut s = Summary::default();
        for o in outcomes {
            if let Some(e) = &o.connect_failed {
                s.connect_failed += 1;
                if s.failures.len() < 3 {
                    s.failures.push(e.clone());
                }
                continue;
            }
            s.opened += 1;
            let connected = o.connected.expect("connected");
            match o.closed {
                None => s.never += 1,
                Some((at, end)) => {
                    let after = at - connected;
                    if after <= in_time {
                        s.in_time += 1;
                    } else {
                        s.late += 1;
                    }
                    s.ends[end as usize] += 1;
                    s.close_after.push(after.as_secs_f64());
                }
            }
        }
        s.close_after.sort_by(f64::total_cmp);
        s
    }

    fn add(&mut self, other: &Summary) {
        self.opened += other.opened;
        self.connect_failed += other.connect_failed;
        self.in_time += other.in_time;
        self.late += other.late;
        self.never += other.never;
        for i in 0..3 {
            self.ends[i] += other.ends[i];
        }
        self.close_after.extend(&other.close_after);
        self.close_after.sort_by(f64::total_cmp);
        self.failures.extend(other.failures.iter().cloned());
    }

    fn close_spread(&self) -> String {
        if self.close_after.is_empty() {
            return "-".to_owned();
        }
        let at = |p: f64| {
            let rank = ((p * self.close_after.len() as f64).ceil() as usize).clamp(1, self.close_after.len());
            self.close_after[rank - 1]
        };
        format!("{:.2} / {:.2} / {:.2}", at(0.0), at(0.5), at(1.0))
    }

    fn print(&self, label: &str, in_time: Duration) {
        println!(
            "    {label}: {} opened, {} connect failures; closed by the server within {:?}: {}, later: {}, never (still open when the driver gave up): {}; closed {} s after connect (min / p50 / max); ended by: close {}, close after an answer {}, reset {}",
            thousands(self.opened as f64),
            self.connect_failed,
            in_time,
            thousands(self.in_time as f64),
            self.late,
            self.never,
            self.close_spread(),
            self.ends[End::Closed as usize],
            self.ends[End::Answered as usize],
            self.ends[End::Reset as usize],
        );
        for e in &self.failures {
            println!("    !!! connect: {e}");
        }
    }
}

/// One slow connection: opened, then idle or trickling until the server
/// closes it or `give_up`.
async fn slow_client(addr: SocketAddr, kind: Kind, give_up: Instant) -> Outcome {
    let mut outcome = Outcome {
        kind,
        connect_failed: None,
        connected: None,
        closed: None,
        port: 0,
        stream: None,
    };
    let mut stream = match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            outcome.connect_failed = Some(e.to_string());
            return outcome;
        }
        Err(_) => {
            outcome.connect_failed = Some("no connection within 10 s".to_owned());
            return outcome;
        }
    };
    let connected = Instant::now();
    outcome.connected = Some(connected);
    outcome.port = stream.local_addr().map_or(0, |a| a.port());
    let (mut reader, mut writer) = stream.split();
    let mut buffer = [0u8; 4096];
    let mut answered = false;
    let mut lines = 0u32;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let end = loop {
        tokio::select! {
            read = reader.read(&mut buffer) => match read {
                Ok(0) => break Some(if answered { End::Answered } else { End::Closed }),
                Ok(_) => answered = true,
                Err(_) => break Some(End::Reset),
            },
            _ = tick.tick(), if kind == Kind::Trickle => {
                let line = if lines == 0 {
                    "GET /healthz HTTP/1.1\r\n".to_owned()
                } else {
                    format!("x-slow-{lines}: 1\r\n")
                };
                lines += 1;
                if writer.write_all(line.as_bytes()).await.is_err() {
                    break Some(End::Reset);
                }
            }
            () = tokio::time::sleep_until(give_up.into()) => break None,
        }
    };
    outcome.closed = end.map(|end| (Instant::now(), end));
    if outcome.closed.is_none() {
        outcome.stream = Some(stream);
    }
    outcome
}
