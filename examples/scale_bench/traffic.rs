//! The traffic: a closed-loop mix of reads over keep-alive connections,
//! each request timed at the client per endpoint, until told to stop; and
//! `POST /v1/events` batches of new events from the same shop.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::shop::{category_name, event_json, item_id, Sessions, ShopSize};

/// The read endpoints, in the order the tables show them.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Endpoint {
    Recommendations,
    Profile,
    Popular,
    PopularCategory,
    Similar,
}

impl Endpoint {
    pub const ALL: [Endpoint; 5] = [
        Endpoint::Recommendations,
        Endpoint::Profile,
        Endpoint::Popular,
        Endpoint::PopularCategory,
        Endpoint::Similar,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Recommendations => "recommendations",
            Endpoint::Profile => "profile",
            Endpoint::Popular => "popular",
            Endpoint::PopularCategory => "popular ?category=",
            Endpoint::Similar => "similar",
        }
    }

    /// Share of the requests: 40% recommendations, 20% profiles, 10% each
    /// popular list, 20% similar items.
    fn pick(rng: &mut StdRng) -> Endpoint {
        match rng.gen_range(0..10) {
            0..=3 => Endpoint::Recommendations,
            4 | 5 => Endpoint::Profile,
            6 => Endpoint::Popular,
            7 => Endpoint::PopularCategory,
            _ => Endpoint::Similar,
        }
    }
}

/// What the reads of one phase measured.
#[derive(Default)]
pub struct Reads {
    pub seconds: f64,
    /// Latency of every answered request (2xx or not), µs, per endpoint.
    pub latencies: BTreeMap<Endpoint, Vec<u32>>,
    /// Non-2xx answers by endpoint and status.
    pub statuses: BTreeMap<(Endpoint, u16), u64>,
    pub transport_errors: u64,
    /// Recommendations answered personally.
    pub personalized: u64,
    /// The first few failures, verbatim.
    pub examples: Vec<String>,
}

impl Reads {
    fn merge(&mut self, other: Reads) {
        for (k, v) in other.latencies {
            self.latencies.entry(k).or_default().extend(v);
        }
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        self.transport_errors += other.transport_errors;
        self.personalized += other.personalized;
        for e in other.examples {
            if self.examples.len() < 5 {
                self.examples.push(e);
            }
        }
    }

    /// Nearest-rank percentile of an endpoint's latency, ms.
    pub fn percentile(&self, endpoint: Endpoint, p: f64) -> f64 {
        let Some(l) = self.latencies.get(&endpoint).filter(|l| !l.is_empty()) else {
            return f64::NAN;
        };
        let rank = ((p / 100.0) * l.len() as f64).ceil() as usize;
        f64::from(l[rank.clamp(1, l.len()) - 1]) / 1000.0
    }

    pub fn count(&self, endpoint: Endpoint) -> usize {
        self.latencies.get(&endpoint).map_or(0, Vec::len)
    }

    /// Non-2xx answers of endpoints and statuses that `which` picks.
    fn non_2xx(&self, which: impl Fn(Endpoint, u16) -> bool) -> u64 {
        self.statuses
            .iter()
            .filter(|((e, s), _)| which(*e, *s))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn errors(&self, endpoint: Endpoint) -> u64 {
        self.non_2xx(|e, _| e == endpoint)
    }

    pub fn status_count(&self, status: u16) -> u64 {
        self.non_2xx(|_, s| s == status)
    }

    pub fn all_errors(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.transport_errors
    }

    pub fn print(&self, phase: &str) {
        let total: usize = Endpoint::ALL.iter().map(|&e| self.count(e)).sum();
        println!(
            "  reads [{phase}]: {total} requests in {:.0} s ({:.0}/s)",
            self.seconds,
            total as f64 / self.seconds.max(1e-9)
        );
        for e in Endpoint::ALL {
            println!(
                "    {:<20} {:>8} requests  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>8.1} ms  non-2xx {}",
                e.label(),
                self.count(e),
                self.percentile(e, 50.0),
                self.percentile(e, 99.0),
                self.percentile(e, 100.0),
                self.errors(e)
            );
        }
        let recs = self.count(Endpoint::Recommendations).max(1);
        println!(
            "    personalized recommendations: {:.1}%",
            100.0 * self.personalized as f64 / recs as f64
        );
        if self.all_errors() > 0 {
            let by: Vec<String> = self
                .statuses
                .iter()
                .map(|((e, s), n)| format!("{n} x {s} on {}", e.label()))
                .collect();
            println!(
                "    !!! ERRORS: [{}], transport {}",
                by.join(", "),
                self.transport_errors
            );
            for e in &self.examples {
                println!("    !!! {e}");
            }
        }
    }
}

/// Who and what the reads ask about.
pub struct Targets {
    pub users: Vec<String>,
    pub items: u64,
    pub categories: u64,
}

/// A running read load; `finish` stops it and collects its figures.
pub struct ReadLoad {
    stop: Arc<AtomicBool>,
    started: Instant,
    tasks: Vec<tokio::task::JoinHandle<Reads>>,
}

impl ReadLoad {
    pub fn start(addr: SocketAddr, targets: Arc<Targets>, connections: usize, seed: u64) -> ReadLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..connections)
            .map(|i| {
                tokio::spawn(read_connection(
                    addr,
                    targets.clone(),
                    stop.clone(),
                    seed.wrapping_mul(1000) + i as u64,
                ))
            })
            .collect();
        ReadLoad {
            stop,
            started: Instant::now(),
            tasks,
        }
    }

    pub async fn finish(self) -> anyhow::Result<Reads> {
        self.stop.store(true, Ordering::Relaxed);
        let mut reads = Reads::default();
        for task in self.tasks {
            reads.merge(task.await?);
        }
        reads.seconds = self.started.elapsed().as_secs_f64();
        for l in reads.latencies.values_mut() {
            l.sort_unstable();
        }
        Ok(reads)
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One request on a keep-alive connection (made anew when there is none):
/// the status and body.
async fn request(
    sender: &mut Option<Sender>,
    addr: SocketAddr,
    method: hyper::Method,
    path: &str,
    body: Bytes,
) -> anyhow::Result<(u16, Bytes)> {
    let mut conn = match sender.take() {
        Some(s) => s,
        None => crate::server::connect(addr).await?,
    };
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))?;
    conn.ready().await?;
    let reply = conn.send_request(request).await?;
    let status = reply.status().as_u16();
    let body = reply.into_body().collect().await?.to_bytes();
    *sender = Some(conn);
    Ok((status, body))
}

const PERSONAL: &[u8] = b"\"strategy\":\"personalized\"";

async fn read_connection(addr: SocketAddr, targets: Arc<Targets>, stop: Arc<AtomicBool>, seed: u64) -> Reads {
    let mut reads = Reads::default();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sender = None;
    while !stop.load(Ordering::Relaxed) {
        let endpoint = Endpoint::pick(&mut rng);
        let user = &targets.users[rng.gen_range(0..targets.users.len())];
        let path = match endpoint {
            Endpoint::Recommendations => format!("/v1/users/{user}/recommendations?n=10"),
            Endpoint::Profile => format!("/v1/users/{user}/profile"),
            Endpoint::Popular => "/v1/popular?n=10".to_owned(),
            Endpoint::PopularCategory => format!(
                "/v1/popular?n=10&category={}",
                category_name(rng.gen_range(0..targets.categories))
            ),
            Endpoint::Similar => {
                // Popular items more often, as product pages are visited.
                let r: f64 = rng.gen();
                let i = ((r * r * targets.items as f64) as u64).min(targets.items - 1);
                format!("/v1/items/{}/similar?n=10", item_id(i))
            }
        };
        let began = Instant::now();
        match request(&mut sender, addr, hyper::Method::GET, &path, Bytes::new()).await {
            Ok((status, body)) => {
                let us = began.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                reads.latencies.entry(endpoint).or_default().push(us);
                if !(200..300).contains(&status) {
                    *reads.statuses.entry((endpoint, status)).or_default() += 1;
                    if reads.examples.len() < 5 {
                        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
                        reads.examples.push(format!("GET {path} -> {status}: {text}"));
                    }
                } else if endpoint == Endpoint::Recommendations && body.windows(PERSONAL.len()).any(|w| w == PERSONAL) {
                    reads.personalized += 1;
                }
            }
            Err(e) => {
                reads.transport_errors += 1;
                if reads.examples.len() < 5 {
                    reads.examples.push(format!("GET {path}: {e}"));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    reads
}

/// What an ingest run measured.
#[derive(Default, Debug)]
pub struct Ingest {
    pub seconds: f64,
    pub accepted: u64,
    pub sent: u64,
    pub failed_batches: u64,
    pub examples: Vec<String>,
}

impl Ingest {
    pub fn rate(&self) -> f64 {
        self.accepted as f64 / self.seconds.max(1e-9)
    }
}

/// Posts batches of `batch` new events of the shop (sessions happening
/// now) from `connections` connections for `seconds`, each connection
/// pausing `pause` between batches (zero: back to back). `run` makes the
/// event ids unique across runs.
pub async fn ingest(
    addr: SocketAddr,
    size: ShopSize,
    run: u64,
    connections: usize,
    batch: usize,
    seconds: f64,
    pause: Duration,
) -> anyhow::Result<Ingest> {
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(seconds);
    let counter = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut out = Ingest::default();
                let now = chrono::Utc::now().timestamp_millis();
                // Sessions of the last hour, each connection its own stream.
                let stream_size = ShopSize {
                    events: u64::MAX,
                    ..size
                };
                let stream = run * 1000 + c as u64;
                let mut sessions = Sessions::new(stream_size, now - 300_000, 1.0 / 24.0, stream, stream << 40);
                let mut sender = None;
                while Instant::now() < end {
                    let mut body = String::with_capacity(batch * 200);
                    body.push_str(r#"{"events":["#);
                    for k in 0..batch {
                        let mut event = sessions.next().expect("an endless stream");
                        event.ts = event.ts.min(now);
                        if k > 0 {
                            body.push(',');
                        }
                        let n = counter.fetch_add(1, Ordering::Relaxed);
                        event_json(&event, &format!("bench-{run}-{n}"), &mut body);
                    }
                    body.push_str("]}");
                    out.sent += batch as u64;
                    match request(&mut sender, addr, hyper::Method::POST, "/v1/events", Bytes::from(body)).await {
                        Ok((200, reply)) => {
                            let doc: serde_json::Value = serde_json::from_slice(&reply).unwrap_or_default();
                            out.accepted += doc["accepted"].as_u64().unwrap_or(0);
                        }
                        Ok((status, reply)) => {
                            out.failed_batches += 1;
                            if out.examples.len() < 3 {
                                let text = String::from_utf8_lossy(&reply[..reply.len().min(300)]).into_owned();
                                out.examples.push(format!("POST /v1/events -> {status}: {text}"));
                            }
                        }
                        Err(e) => {
                            out.failed_batches += 1;
                            if out.examples.len() < 3 {
                                out.examples.push(format!("POST /v1/events: {e}"));
                            }
                        }
                    }
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
                out
            })
        })
        .collect();
    let mut total = Ingest::default();
    for task in tasks {
        let one = task.await?;
        total.accepted += one.accepted;
        total.sent += one.sent;
        total.failed_batches += one.failed_batches;
        total.examples.extend(one.examples);
    }
    total.seconds = started.elapsed().as_secs_f64();
    Ok(total)
}
