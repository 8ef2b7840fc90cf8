//! The closing Markdown table: every figure, with the target
//! beside it and whether it was met. Errors and 503s are figures too.

use crate::system::thousands;
use crate::traffic::{Endpoint, Reads};

/// The targets of a size: the 50-million-event ones from 50 million events
/// on, else the 5-million-event ones.
#[derive(Clone, Copy)]
pub struct Targets {
    pub large: bool,
}

impl Targets {
    pub fn train_seconds(self) -> f64 {
        if self.large {
            900.0
        } else {
            420.0
        }
    }

    pub fn train_rss_gib(self) -> f64 {
        if self.large {
            2.0
        } else {
            1.0
        }
    }
}

pub struct Table {
    rows: Vec<[String; 4]>,
    missed: usize,
}

impl Table {
    pub fn new() -> Table {
        Table {
            rows: Vec::new(),
            missed: 0,
        }
    }

    /// A figure with no target.
    pub fn figure(&mut self, what: &str, value: String) {
        self.rows.push([what.to_owned(), value, String::new(), String::new()]);
    }

    /// A figure and its target; `met` is None when it could not be measured.
    pub fn target(&mut self, what: &str, value: String, target: &str, met: Option<bool>) {
        let verdict = match met {
            Some(true) => "PASS",
            Some(false) => "**MISS**",
            None => "**not measured**",
        };
        if met != Some(true) {
            self.missed += 1;
        }
        self.rows
            .push([what.to_owned(), value, target.to_owned(), verdict.to_owned()]);
    }

    /// A phase's reads: p50/p99 per endpoint, errors and 503s; with the
    /// 20 ms p99 and no-503 target when `targeted`.
    pub fn reads(&mut self, phase: &str, reads: &Reads, targeted: bool) {
        for e in Endpoint::ALL {
            let (p50, p99) = (reads.percentile(e, 50.0), reads.percentile(e, 99.0));
            let value = format!(
                "p50 {p50:.2} ms, p99 {p99:.2} ms ({} requests, {} non-2xx)",
                thousands(reads.count(e) as f64),
                reads.errors(e)
            );
            let what = format!("{phase}: {}", e.label());
            if targeted {
                self.target(&what, value, "p99 <= 20 ms", Some(p99 <= 20.0 && reads.errors(e) == 0));
            } else {
                self.figure(&what, value);
            }
        }
        let unavailable = reads.status_count(503);
        let value = format!(
            "{unavailable} x 503; {} non-2xx in all, {} transport errors",
            reads.all_errors() - reads.transport_errors,
            reads.transport_errors
        );
        let what = format!("{phase}: 503s");
        if targeted {
            self.target(&what, value, "none", Some(reads.all_errors() == 0));
        } else {
            self.figure(&what, value);
        }
    }

    pub fn print(&self, title: &str) {
        println!("\n## {title}\n");
        println!("| measure | figure | target | |");
        println!("| --- | --- | --- | --- |");
        for [what, value, target, verdict] in &self.rows {
            println!("| {what} | {value} | {target} | {verdict} |");
        }
        println!(
            "\n{} target(s) missed or not measured.",
            if self.missed == 0 {
                "No".to_owned()
            } else {
                self.missed.to_string()
            }
        );
    }
}

pub fn gib(kb: u64) -> String {
    format!("{:.2} GiB", kb as f64 / (1024.0 * 1024.0))
}
