//! `recd import`: the CSV format of the evaluation data into the store, with
//! the API's own validation (each row is checked as the JSON event it
//! stands for), in batches of 1000 written set-based.
//!
//! events.csv: `user_id,item_id,type,value,timestamp` (optional `event_id`,
//! `session_id` columns). items.csv: `item_id,title,category,categories`
//! with categories split by `|`.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{Map, Number, Value};

use crate::domain::Item;
use crate::ingest::{check_id, derived_event_id, validate_event, FieldError};
use crate::store::Store;

const BATCH: usize = 1000;
/// Bad rows printed in full; the rest are counted.
const SHOWN_ERRORS: usize = 20;

#[derive(Debug, Default, Serialize)]
pub struct ImportReport {
    pub rows: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
}

/// A bar over the bytes of the file, drawn only on a terminal.
fn progress(path: &Path, what: &str) -> ProgressBar {
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_owned());
    bar
}

struct Counting<R> {
    inner: R,
    bar: ProgressBar,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

fn open_csv(path: &Path, what: &str) -> anyhow::Result<(csv::Reader<Counting<BufReader<File>>>, ProgressBar)> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let bar = progress(path, what);
    let reader = csv::ReaderBuilder::new().flexible(true).from_reader(Counting {
        inner: BufReader::new(file),
        bar: bar.clone(),
    });
    Ok((reader, bar))
}

fn report_bad_row(line: u64, errors: &[FieldError], shown: &mut usize) {
    if *shown < SHOWN_ERRORS {
        let reasons: Vec<String> = errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect();
        tracing::warn!("line {line}: {}", reasons.join("; "));
    } else if *shown == SHOWN_ERRORS {
        tracing::warn!("more bad rows; only counting them from here");
    }
    *shown += 1;
}

/// Imports an events file. Rows with no `event_id` get one derived from their
/// fields, so importing the same file again stores nothing twice.
pub async fn import_events(store: &Store, path: &Path) -> anyhow::Result<ImportReport> {
    let (mut reader, bar) = open_csv(path, "events")?;
    let headers = reader.headers()?.clone();
    for needed in ["user_id", "item_id", "type"] {
        anyhow::ensure!(
            headers.iter().any(|h| h == needed),
            "{} has no {needed} column (expected user_id,item_id,type,value,timestamp)",
            path.display()
        );
    }
    let now = crate::clock::now_ms();
    let mut report = ImportReport::default();
    let mut batch = Vec::with_capacity(BATCH);
    let mut shown = 0;
    for record in reader.records() {
        report.rows += 1;
        // Line 1 is the header.
        let line = report.rows + 1;
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                report.rejected += 1;
                report_bad_row(line, &[FieldError::new("row", e.to_string())], &mut shown);
                continue;
            }
        };
        let mut event = Map::new();
        for (header, field) in headers.iter().zip(record.iter()) {
            if field.is_empty() {
                continue;
            }
            let value = match header {
                "value" => field
                    .parse::<f64>()
                    .ok()
                    .and_then(Number::from_f64)
                    .map_or_else(|| Value::String(field.to_owned()), Value::Number),
                _ => Value::String(field.to_owned()),
            };
            event.insert(header.to_owned(), value);
        }
        match validate_event(&Value::Object(event), now) {
            Ok(mut event) => {
                if event.event_id.is_none() {
                    event.event_id = Some(derived_event_id(&event));
                }
                batch.push(event);
            }
            Err(errors) => {
                report.rejected += 1;
                report_bad_row(line, &errors, &mut shown);
            }
        }
        if batch.len() == BATCH {
            flush(store, &mut batch, &mut report, now).await?;
        }
    }
    flush(store, &mut batch, &mut report, now).await?;
    bar.finish_and_clear();
    Ok(report)
}

async fn flush(
    store: &Store,
    batch: &mut Vec<crate::domain::NewEvent>,
    report: &mut ImportReport,
    now: i64,
) -> anyhow::Result<()> {
    let accepted = store.insert_events(batch, now).await?;
    report.accepted += accepted;
    report.duplicates += batch.len() as u64 - accepted;
    batch.clear();
    Ok(())
}

/// Imports an items file (upsert).
pub async fn import_items(store: &Store, path: &Path) -> anyhow::Result<ImportReport> {
    let (mut reader, bar) = open_csv(path, "items")?;
    let headers = reader.headers()?.clone();
    let column = |name: &str| headers.iter().position(|h| h == name);
    let id_col = column("item_id").with_context(|| format!("{} has no item_id column", path.display()))?;
    let (title_col, category_col, categories_col) = (column("title"), column("category"), column("categories"));
    let now = crate::clock::now_ms();
    let mut report = ImportReport::default();
    let mut batch = Vec::with_capacity(BATCH);
    let mut shown = 0;
    for record in reader.records() {
        report.rows += 1;
        let line = report.rows + 1;
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                report.rejected += 1;
                report_bad_row(line, &[FieldError::new("row", e.to_string())], &mut shown);
                continue;
            }
        };
        let get = |col: Option<usize>| col.and_then(|c| record.get(c)).filter(|s| !s.is_empty());
        let item_id = get(Some(id_col)).unwrap_or_default();
        let categories = crate::ingest::split_categories(get(categories_col), get(category_col));
        let errors: Vec<FieldError> = std::iter::once(check_id("item_id", item_id))
            .chain(categories.iter().map(|c| check_id("categories", c)))
            .filter_map(Result::err)
            .collect();
        if !errors.is_empty() {
            report.rejected += 1;
            report_bad_row(line, &errors, &mut shown);
            continue;
        }
        batch.push(Item {
            item_id: item_id.to_owned(),
            title: get(title_col).map(str::to_owned),
            categories,
            price: None,
            available: true,
            attributes: Map::new(),
        });
        if batch.len() == BATCH {
            store.put_items(&batch, now).await?;
            report.accepted += batch.len() as u64;
            batch.clear();
        }
    }
    store.put_items(&batch, now).await?;
    report.accepted += batch.len() as u64;
    bar.finish_and_clear();
    Ok(report)
}
