//! The client side the scenarios share: requests on bare HTTP/1.1
//! keep-alive connections (one hyper connection per task, no pool, so each
//! connection is under the driver's control), what they measured, loads at
//! a fixed rate or in a closed loop, and the server's `/metrics`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header;
use tokio_util::sync::CancellationToken;

pub type Body = Full<Bytes>;
pub type Sender = hyper::client::conn::http1::SendRequest<Body>;

/// What a request asks: a path, and the name its figures are kept under.
pub type Ask = (String, &'static str);
/// Makes the `k`-th request of connection `conn`.
pub type Asker = Arc<dyn Fn(usize, u64) -> Ask + Send + Sync>;

pub async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    crate::server::connect(addr).await
}

pub fn get(addr: SocketAddr, path: &str) -> hyper::Request<Body> {
    hyper::Request::get(path)
        .header(header::HOST, addr.to_string())
        .body(Body::new(Bytes::new()))
        .expect("a valid request")
}

pub fn post_json(addr: SocketAddr, path: &str, body: Bytes) -> hyper::Request<Body> {
    hyper::Request::post(path)
        .header(header::HOST, addr.to_string())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::new(body))
        .expect("a valid request")
}

/// `GET /v1/users/{user}/recommendations?n=10`; with `fresh`, an
/// `exclude_items` id that exists nowhere and was never asked before, so the
/// answer is a ranking made for this request rather than the user's last one.
pub fn recs_path(user: &str, fresh: Option<(usize, u64)>) -> String {
    match fresh {
        Some((conn, k)) => format!("/v1/users/{user}/recommendations?n=10&exclude_items=nowhere-{conn}-{k}"),
        None => format!("/v1/users/{user}/recommendations?n=10"),
    }
}

/// An answer as the figures need it.
pub struct Answer {
    pub status: u16,
    pub retry_after: bool,
    /// The server said `Connection: close`: the connection is not reused.
    pub close: bool,
    pub body: Bytes,
}

/// Sends `request` on `sender` and reads the whole answer.
pub async fn send(sender: &mut Sender, request: hyper::Request<Body>) -> anyhow::Result<Answer> {
    sender.ready().await?;
    let reply = sender.send_request(request).await?;
    let status = reply.status().as_u16();
    let retry_after = reply.headers().contains_key(header::RETRY_AFTER);
    let close = reply
        .headers()
        .get(header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let body = reply.into_body().collect().await?.to_bytes();
    Ok(Answer {
        status,
        retry_after,
        close,
        body,
    })
}

/// What a set of requests measured.
#[derive(Default)]
pub struct Tally {
    /// 2xx answers.
    pub ok: u64,
    /// Latency of each 2xx answer, microseconds (sorted by `finish`).
    pub latencies_us: Vec<u32>,
    /// Other answers by status.
    pub statuses: BTreeMap<u16, u64>,
    /// 503 answers without `Retry-After`.
    pub no_retry_after: u64,
    /// Requests that got no answer (reset, closed, timed out...).
    pub transport_errors: u64,
    /// Connections that could not be opened.
    pub connect_errors: u64,
    /// Connections opened (one per client connection when none is closed).
    pub connects: u64,
    /// The slowest 2xx answer, microseconds, and when it arrived.
    pub worst: Option<(u32, Instant)>,
    /// 2xx answers by the 250 ms window they completed in (recovery).
    pub windows: Vec<u64>,
    /// The first few failures, verbatim.
    pub examples: Vec<String>,
}

impl Tally {
    pub fn note(&mut self, what: String) {
        if self.examples.len() < 5 {
            self.examples.push(what);
        }
    }

    /// Counts an answer; its latency is kept when it is 2xx.
    pub fn answer(&mut self, answer: &Answer, latency: Duration, path: &str) {
        if (200..300).contains(&answer.status) {
            self.ok += 1;
            let us = latency.as_micros().min(u128::from(u32::MAX)) as u32;
            self.latencies_us.push(us);
            if self.worst.is_none_or(|(worst, _)| us > worst) {
                self.worst = Some((us, Instant::now()));
            }
            return;
        }
        *self.statuses.entry(answer.status).or_default() += 1;
        if answer.status == 503 && !answer.retry_after {
            self.no_retry_after += 1;
        }
        if self.examples.len() < 5 {
            let text = String::from_utf8_lossy(&answer.body[..answer.body.len().min(200)]).into_owned();
            self.note(format!("{path} -> {}: {text}", answer.status));
        }
    }

    pub fn non_2xx(&self) -> u64 {
        self.statuses.values().sum()
    }

    pub fn status(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    pub fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.latencies_us.extend(other.latencies_us);
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        self.no_retry_after += other.no_retry_after;
        self.transport_errors += other.transport_errors;
        self.connect_errors += other.connect_errors;
        self.connects += other.connects;
        if let Some((us, at)) = other.worst {
            if self.worst.is_none_or(|(worst, _)| us > worst) {
                self.worst = Some((us, at));
            }
        }
        if self.windows.len() < other.windows.len() {
            self.windows.resize(other.windows.len(), 0);
        }
        for (i, n) in other.windows.into_iter().enumerate() {
            self.windows[i] += n;
        }
        for e in other.examples {
            self.note(e);
        }
    }

    /// Sorts the latencies, once every connection's are merged.
    pub fn finish(mut self) -> Tally {
        self.latencies_us.sort_unstable();
        self
    }

    /// Nearest-rank percentile of the 2xx latencies, milliseconds.
    pub fn percentile(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * self.latencies_us.len() as f64).ceil() as usize;
        f64::from(self.latencies_us[rank.clamp(1, self.latencies_us.len()) - 1]) / 1000.0
    }

    /// Non-2xx answers and failures, for a line of their own.
    pub fn failures(&self) -> String {
        let mut parts: Vec<String> = self.statuses.iter().map(|(s, n)| format!("{n} x {s}")).collect();
        if self.transport_errors > 0 {
            parts.push(format!("{} transport errors", self.transport_errors));
        }
        if self.connect_errors > 0 {
            parts.push(format!("{} connect failures", self.connect_errors));
        }
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join(", ")
        }
    }

    pub fn print_examples(&self, indent: &str) {
        for e in &self.examples {
            println!("{indent}!!! {e}");
        }
    }
}

/// Figures kept by route name.
pub type ByRoute = BTreeMap<&'static str, Tally>;

fn merge_routes(into: &mut ByRoute, from: ByRoute) {
    for (route, tally) in from {
        into.entry(route).or_default().merge(tally);
    }
}

/// What a fixed-rate load measured.
pub struct PacedRun {
    pub routes: ByRoute,
    /// Measured seconds.
    pub seconds: f64,
    /// Connections opened: one per client connection unless the server
    /// closed some.
    pub connects: u64,
    /// When the schedule began.
    pub began: Instant,
    /// The client connections.
    pub clients: usize,
}

/// A fixed-rate load: `connections` keep-alive connections, opened first,
/// sending `rate` requests/s together, each on its own schedule. A
/// request's latency runs from when it was due, so a server that stalls
/// shows slow answers rather than fewer requests (no coordinated omission).
/// Runs until `stop`; only requests due `warmup` or more after the start
/// are counted.
pub async fn paced(
    addr: SocketAddr,
    connections: usize,
    rate: f64,
    ask: Asker,
    warmup: Duration,
    stop: CancellationToken,
) -> anyhow::Result<PacedRun> {
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    let mut senders = Vec::with_capacity(connections);
    for _ in 0..connections {
        senders.push(connect(addr).await?);
    }
    let began = Instant::now();
    let counted_from = began + warmup;
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(conn, sender)| {
            let (ask, stop) = (ask.clone(), stop.clone());
            // Spread the connections' schedules over one interval.
            let first = began + interval.mul_f64(conn as f64 / connections as f64);
            let schedule = Schedule {
                first,
                interval,
                counted_from,
            };
            tokio::spawn(paced_connection(addr, conn, sender, schedule, ask, stop))
        })
        .collect();
    let (mut routes, mut connects) = (ByRoute::new(), connections as u64);
    for task in tasks {
        let (by_route, reconnects) = task.await?;
        merge_routes(&mut routes, by_route);
        connects += reconnects;
    }
    Ok(PacedRun {
        routes: routes.into_iter().map(|(r, t)| (r, t.finish())).collect(),
        seconds: Instant::now().saturating_duration_since(counted_from).as_secs_f64(),
        connects,
        began,
        clients: connections,
    })
}

/// When a paced connection's requests are due, and which are counted.
struct Schedule {
    first: Instant,
    interval: Duration,
    counted_from: Instant,
}

/// One paced connection; its figures by route, and how many times it had
/// to connect again.
async fn paced_connection(
    addr: SocketAddr,
    conn: usize,
    sender: Sender,
    schedule: Schedule,
    ask: Asker,
    stop: CancellationToken,
) -> (ByRoute, u64) {
    let mut routes = ByRoute::new();
    let mut sender = Some(sender);
    let (mut k, mut reconnects) = (0u64, 0u64);
    loop {
        let due = schedule.first + schedule.interval.mul_f64(k as f64);
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(due.into()) => {}
        }
        let (path, route) = ask(conn, k);
        k += 1;
        let counted = due >= schedule.counted_from;
        let tally = routes.entry(route).or_default();
        let mut s = match sender.take() {
            Some(s) => s,
            None => match connect(addr).await {
                Ok(s) => {
                    reconnects += 1;
                    s
                }
                Err(e) => {
                    if counted {
                        tally.connect_errors += 1;
                        tally.note(format!("connect: {e}"));
                    }
                    continue;
                }
            },
        };
        let answer = tokio::select! {
            () = stop.cancelled() => break,
            answer = send(&mut s, get(addr, &path)) => answer,
        };
        let latency = due.elapsed();
        match answer {
            Ok(answer) => {
                if !answer.close {
                    sender = Some(s);
                }
                if counted {
                    tally.answer(&answer, latency, &path);
                }
            }
            Err(e) => {
                if counted {
                    tally.transport_errors += 1;
                    tally.note(format!("{path}: {e}"));
                }
            }
        }
    }
    (routes, reconnects)
}

/// One connection of a closed-loop load: requests back to back from when
/// it is opened until `end`, when the request in flight is dropped and the
/// connection closed. Counted: requests begun at or after `start`; with
/// `windows`, 2xx answers also by the 250 ms window (from the given
/// instant) they completed in.
pub async fn closed_loop(
    addr: SocketAddr,
    conn: usize,
    ask: Asker,
    start: Instant,
    end: Instant,
    windows: Option<Instant>,
) -> Tally {
    let mut tally = Tally::default();
    let mut sender: Option<Sender> = None;
    let mut k = 0u64;
    while Instant::now() < end {
        let mut s = match sender.take() {
            Some(s) => s,
            None => match tokio::time::timeout_at(end.into(), connect(addr)).await {
                Ok(Ok(s)) => {
                    tally.connects += 1;
                    s
                }
                Ok(Err(e)) => {
                    tally.connect_errors += 1;
                    tally.note(format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Err(_) => break,
            },
        };
        let (path, _) = ask(conn, k);
        k += 1;
        let began = Instant::now();
        let counted = began >= start;
        let answer = match tokio::time::timeout_at(end.into(), send(&mut s, get(addr, &path))).await {
            Ok(answer) => answer,
            // The phase is over: the request in flight is abandoned.
            Err(_) => break,
        };
        let done = Instant::now();
        match answer {
            Ok(answer) => {
                if !answer.close {
                    sender = Some(s);
                }
                if !counted {
                    continue;
                }
                tally.answer(&answer, done - began, &path);
                if let (Some(origin), true) = (windows, (200..300).contains(&answer.status)) {
                    let w = (done.saturating_duration_since(origin).as_millis() / 250) as usize;
                    if tally.windows.len() <= w {
                        tally.windows.resize(w + 1, 0);
                    }
                    tally.windows[w] += 1;
                }
            }
            Err(e) => {
                if counted {
                    tally.transport_errors += 1;
                    tally.note(format!("{path}: {e}"));
                }
            }
        }
    }
    tally
}

/// The server's `/metrics` text.
pub async fn metrics(addr: SocketAddr) -> anyhow::Result<String> {
    Ok(reqwest::get(format!("http://{addr}/metrics")).await?.text().await?)
}

/// The sum of the samples of metric `name` whose labels contain `labels`
/// (e.g. `reason="queue_full"`; empty: all).
pub fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric_name = series.split('{').next()?;
            (metric_name == name && series.contains(labels)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// `p50 / p99` milliseconds.
pub fn p50_p99(tally: &Tally) -> String {
    format!("{:.2} / {:.2}", tally.percentile(50.0), tally.percentile(99.0))
}

/// The highest the server's RSS, its open connections and its admission's
/// gauges (`recd_http_connections_open`, `recd_requests_running`,
/// `recd_requests_queued`) were while sampled.
#[derive(Default, Clone, Copy)]
pub struct Peaks {
    pub rss_kb: u64,
    pub open_connections: f64,
    pub running: f64,
    pub queued: f64,
    /// `/metrics` answers read.
    pub samples: u64,
}

/// Samples the server (`pid`, at `addr`) every `every` until `stop`: its
/// RSS from /proc, and on a loop of its own (an answer may be slow under
/// load) its gauges from `/metrics`.
pub fn sample_peaks(
    addr: SocketAddr,
    pid: u32,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Peaks> {
    let gauges = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut peaks = Peaks::default();
            let client = reqwest::Client::new();
            let url = format!("http://{addr}/metrics");
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let text = tokio::select! {
                    () = stop.cancelled() => break,
                    _ = tick.tick() => match client.get(&url).send().await {
                        Ok(reply) => reply.text().await.unwrap_or_default(),
                        Err(_) => continue,
                    },
                };
                peaks.open_connections = peaks
                    .open_connections
                    .max(metric(&text, "recd_http_connections_open", ""));
                peaks.running = peaks.running.max(metric(&text, "recd_requests_running", ""));
                peaks.queued = peaks.queued.max(metric(&text, "recd_requests_queued", ""));
                peaks.samples += 1;
            }
            peaks
        }
    });
    tokio::spawn(async move {
        let mut rss_kb = 0;
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Ok((rss, _)) = crate::system::rss_kb(pid) {
                rss_kb = rss_kb.max(rss);
            }
        }
        let mut peaks = gauges.await.unwrap_or_default();
        peaks.rss_kb = rss_kb;
        peaks
    })
}

/// New clients: every `every` until `stop`, a new connection asks
/// `GET /healthz` once; the time from the connect to the answer (at most
/// 5 s, then a transport error). Each on its own task, so a slow one does
/// not hold back the next.
pub async fn newcomers(addr: SocketAddr, every: Duration, stop: CancellationToken) -> anyhow::Result<Tally> {
    let mut tick = tokio::time::interval(every);
    let mut probes = Vec::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        probes.push(tokio::spawn(async move {
            let began = Instant::now();
            let answer = tokio::time::timeout(Duration::from_secs(5), async {
                let mut sender = connect(addr).await?;
                send(&mut sender, get(addr, "/healthz")).await
            })
            .await;
            (answer, began.elapsed())
        }));
    }
    let mut tally = Tally::default();
    for probe in probes {
        let (answer, latency) = probe.await?;
        tally.connects += 1;
        match answer {
            Ok(Ok(answer)) => tally.answer(&answer, latency, "/healthz"),
            Ok(Err(e)) => {
                tally.transport_errors += 1;
                tally.note(format!("new connection: {e}"));
            }
            Err(_) => {
                tally.transport_errors += 1;
                tally.note("new connection: no answer within 5 s".to_owned());
            }
        }
    }
    Ok(tally.finish())
}
