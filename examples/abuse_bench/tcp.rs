//! What the kernel says about the connections (Linux, machine-wide): the
//! listen-queue counters of `/proc/net/netstat`, and whether a connection
//! the client holds has a server-side socket at all (`/proc/net/tcp`).
//!
//! A client can hold a connection the server never saw: when the listen
//! queue is full the kernel answers SYNs with SYN cookies and then drops the
//! handshake's last ACK (a listen overflow); the client is connected, the
//! server keeps no state, and a client that sends nothing stays so.

use std::collections::{BTreeMap, HashSet};

/// The `TcpExt` counters of a listen queue's trouble.
const COUNTERS: [&str; 5] = [
    "ListenOverflows",
    "ListenDrops",
    "SyncookiesSent",
    "SyncookiesRecv",
    "SyncookiesFailed",
];

/// Machine-wide TCP counters at one moment.
pub struct Counters(BTreeMap<String, u64>);

impl Counters {
    pub fn read() -> Counters {
        let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
        let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
        let mut map = BTreeMap::new();
        if let (Some(names), Some(values)) = (lines.next(), lines.next()) {
            for (name, value) in names.split_whitespace().zip(values.split_whitespace()).skip(1) {
                if COUNTERS.contains(&name) {
                    map.insert(name.to_owned(), value.parse().unwrap_or(0));
                }
            }
        }
        Counters(map)
    }

    /// How much counter `name` grew since `before`.
    pub fn grew(&self, before: &Counters, name: &str) -> u64 {
        let get = |c: &Counters| c.0.get(name).copied().unwrap_or(0);
        get(self).saturating_sub(get(before))
    }

    /// The counters that grew since `before`, e.g. "ListenOverflows +48";
    /// "none" when none did.
    pub fn since(&self, before: &Counters) -> String {
        let grew: Vec<String> = self
            .0
            .iter()
            .filter_map(|(name, &now)| {
                let then = before.0.get(name).copied().unwrap_or(0);
                (now > then).then(|| format!("{name} +{}", now - then))
            })
            .collect();
        if grew.is_empty() {
            "none".to_owned()
        } else {
            grew.join(", ")
        }
    }
}

/// The client ports of the connections to `server_port` that the server
/// side holds a socket for (IPv4 loopback, any state but LISTEN).
pub fn server_side_peers(server_port: u16) -> HashSet<u16> {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let port = |address: &str| {
        address
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, state) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
            (port(local)? == server_port && *state != "0A").then(|| port(remote))?
        })
        .collect()
}

/// The connections waiting in the accept queue of the listener on `port`
/// (for a listener, `/proc/net/tcp`'s rx_queue). Listeners come first in
/// that file: it is read only as far as they go, which stays cheap with
/// thousands of connections open.
pub fn accept_queue(port: u16) -> Option<u32> {
    use std::io::BufRead;
    let file = std::fs::File::open("/proc/net/tcp").ok()?;
    for line in std::io::BufReader::new(file).lines().skip(1) {
        let line = line.ok()?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, state, queues) = (fields.get(1)?, fields.get(3)?, fields.get(4)?);
        if *state != "0A" {
            return None;
        }
        if u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()? == port {
            return u32::from_str_radix(queues.split_once(':')?.1, 16).ok();
        }
    }
    None
}

/// The listen backlog of the listener on `port` (`ss`'s Send-Q), if `ss`
/// is there to say.
pub fn listen_backlog(port: u16) -> Option<u32> {
    let output = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{port}")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines().next()?.split_whitespace().nth(2)?.parse().ok()
}

/// Samples the accept queue of the listener on `port` every `every` until
/// `stop`: the longest it was.
pub fn sample_accept_queue(
    port: u16,
    every: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<u32> {
    tokio::spawn(async move {
        let mut longest = 0;
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Some(queued) = accept_queue(port) {
                longest = longest.max(queued);
            }
        }
        longest
    })
}
