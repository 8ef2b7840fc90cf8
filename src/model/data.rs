//! Events to sequences: each user's events in time order (ties in arrival
//! order), items mapped to dense indexes, and the leave-one-out split (see
//! docs/evaluation.md).

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;

use crate::domain::{EventRow, EventType};
use crate::ingest::parse_timestamp;

/// One position of a sequence: a dense item index (1-based; 0 is padding)
/// and an event type code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub item: u32,
    pub kind: u8,
}

/// Every user's events as a sequence of dense item indexes.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// Dense index - 1 -> item id.
    pub item_ids: Vec<String>,
    pub user_ids: Vec<String>,
    pub sequences: Vec<Vec<Step>>,
    pub events: usize,
    /// The newest timestamp seen (ms), the training cutoff of a snapshot.
    pub newest_ms: i64,
    /// Per dense item index, a dense category index (0: none); empty until
    /// `set_categories`.
    pub item_category: Vec<u32>,
    /// Distinct categories in `item_category`.
    pub categories: usize,
    /// Per user, the position of their first event newer than a served
    /// model's data (the sequence's length when none is); empty unless the
    /// builder was asked (`DatasetBuilder::fresh_after`).
    pub fresh_from: Vec<usize>,
}

impl Dataset {
    /// Builds the sequences from rows in arrival order: a stable sort by
    /// time keeps arrival order among equal timestamps.
    pub fn from_events(mut rows: Vec<EventRow>) -> Self {
        rows.sort_by_key(|r| r.timestamp_ms);
        let mut builder = DatasetBuilder::default();
        for row in rows {
            builder.push(row);
        }
        builder.finish()
    }

    pub fn items(&self) -> usize {
        self.item_ids.len()
    }

    /// Gives each item its primary category (item id -> category) as a
    /// dense index, numbered in item order so that a run is reproducible.
    pub fn set_categories(&mut self, primary: &HashMap<String, String>) {
        let mut index: HashMap<&str, u32> = HashMap::new();
        let mut item_category = vec![0; self.items() + 1];
        for (i, id) in self.item_ids.iter().enumerate() {
            if let Some(category) = primary.get(id) {
                let next = index.len() as u32 + 1;
                item_category[i + 1] = *index.entry(category.as_str()).or_insert(next);
            }
        }
        self.categories = index.len();
        self.item_category = item_category;
    }

    pub fn users(&self) -> usize {
        self.user_ids.len()
    }
}

/// Builds a [`Dataset`] from events given one at a time in time order
/// (ties in arrival order), as a store streams them: memory grows with the
/// sequences, never with a copy of the rows.
#[derive(Debug, Default)]
pub struct DatasetBuilder {
    data: Dataset,
    item_index: HashMap<String, u32>,
    user_index: HashMap<String, usize>,
    /// Events after this time are new to a served model.
    fresh_after: Option<i64>,
}

impl DatasetBuilder {
    /// A builder that also notes where each user's events newer than
    /// `cutoff_ms` begin (`Dataset::fresh_from`).
    pub fn fresh_after(cutoff_ms: i64) -> Self {
        DatasetBuilder {
            fresh_after: Some(cutoff_ms),
            ..DatasetBuilder::default()
        }
    }

    pub fn push(&mut self, row: EventRow) {
        let data = &mut self.data;
        let item = match self.item_index.get(&row.item_id) {
            Some(&i) => i,
            None => {
                data.item_ids.push(row.item_id.clone());
                let i = data.item_ids.len() as u32;
                self.item_index.insert(row.item_id, i);
                i
            }
        };
        let tracked = self.fresh_after.is_some();
        let user = *self.user_index.entry(row.user_id.clone()).or_insert_with(|| {
            data.user_ids.push(row.user_id);
            data.sequences.push(Vec::new());
            if tracked {
                data.fresh_from.push(usize::MAX);
            }
            data.sequences.len() - 1
        });
        let at = data.sequences[user].len();
        data.sequences[user].push(Step { item, kind: row.kind });
        if let Some(cutoff) = self.fresh_after {
            if row.timestamp_ms > cutoff && data.fresh_from[user] == usize::MAX {
                data.fresh_from[user] = at;
            }
        }
        data.events += 1;
        data.newest_ms = data.newest_ms.max(row.timestamp_ms);
    }

    /// Events pushed so far.
    pub fn events(&self) -> usize {
        self.data.events
    }

    pub fn finish(self) -> Dataset {
        let mut data = self.data;
        for (from, seq) in data.fresh_from.iter_mut().zip(&data.sequences) {
            *from = (*from).min(seq.len());
        }
        data
    }
}

/// A held-out prediction: from the first `prefix` steps of `user`'s
/// sequence, rank `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    pub user: u32,
    pub prefix: u32,
    pub target: u32,
}

/// Leave-one-out in time order: the last event of every user with at least 3
/// events is the test target, the one before it validation, the rest train.
#[derive(Debug, Clone, Default)]
pub struct Split {
    /// Per user, how many leading steps are training data.
    pub train_len: Vec<usize>,
    pub valid: Vec<Case>,
    pub test: Vec<Case>,
}

impl Split {
    pub fn leave_one_out(data: &Dataset) -> Self {
        let mut split = Split::default();
        for (user, seq) in data.sequences.iter().enumerate() {
            let n = seq.len();
            if n < 3 {
                split.train_len.push(n);
                continue;
            }
            split.train_len.push(n - 2);
            split.valid.push(Case {
                user: user as u32,
                prefix: (n - 2) as u32,
                target: seq[n - 2].item,
            });
            split.test.push(Case {
                user: user as u32,
                prefix: (n - 1) as u32,
                target: seq[n - 1].item,
            });
        }
        split
    }
}

/// At most `max` of `cases`, a sample drawn with `rng` when there are more.
pub fn sample_cases(cases: &[Case], max: usize, rng: &mut rand::rngs::StdRng) -> Vec<Case> {
    use rand::seq::SliceRandom;
    let mut cases = cases.to_vec();
    if cases.len() > max {
        cases.shuffle(rng);
        cases.truncate(max);
    }
    cases
}

/// Reads an items CSV (`item_id,title,category,categories`, the format
/// `recd import` reads)
/// into each item's primary (first) category.
pub fn load_item_categories_csv(path: &Path) -> anyhow::Result<HashMap<String, String>> {
    let mut reader = csv::Reader::from_path(path).with_context(|| format!("cannot open {}", path.display()))?;
    let headers = reader.headers()?.clone();
    let column = |name: &str| headers.iter().position(|h| h == name);
    let id = column("item_id").with_context(|| format!("{}: no `item_id` column", path.display()))?;
    let (category, categories) = (column("category"), column("categories"));
    let mut primary = HashMap::new();
    for record in reader.records() {
        let record = record?;
        let get = |col: Option<usize>| col.and_then(|c| record.get(c)).filter(|s| !s.is_empty());
        if let (Some(item), Some(first)) = (
            get(Some(id)),
            crate::ingest::split_categories(get(categories), get(category)).first(),
        ) {
            primary.insert(item.to_owned(), first.clone());
        }
    }
    Ok(primary)
}

/// Reads an events CSV (`user_id,item_id,type,value,timestamp`, the format
/// `recd import` reads).
pub fn load_events_csv(path: &Path) -> anyhow::Result<Vec<EventRow>> {
    let mut reader = csv::Reader::from_path(path).with_context(|| format!("cannot open {}", path.display()))?;
    let headers = reader.headers()?.clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("{}: no `{name}` column", path.display()))
    };
    let (user, item, kind, ts) = (
        column("user_id")?,
        column("item_id")?,
        column("type")?,
        column("timestamp")?,
    );
    let mut rows = Vec::new();
    for (line, record) in reader.records().enumerate() {
        let record = record?;
        let line = line + 2;
        let field = |i: usize| record.get(i).unwrap_or("");
        let kind = EventType::parse(field(kind))
            .with_context(|| format!("{}:{line}: unknown event type {:?}", path.display(), field(kind)))?;
        let timestamp_ms =
            parse_timestamp(field(ts)).map_err(|e| anyhow::anyhow!("{}:{line}: {}", path.display(), e.message))?;
        rows.push(EventRow {
            user_id: field(user).to_owned(),
            item_id: field(item).to_owned(),
            kind: kind.code() as u8,
            timestamp_ms,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(user: &str, item: &str, ts: i64) -> EventRow {
        EventRow {
            user_id: user.into(),
            item_id: item.into(),
            kind: 0,
            timestamp_ms: ts,
        }
    }

    #[test]
    fn sequences_follow_time_then_arrival() {
        let data = Dataset::from_events(vec![row("u", "b", 2), row("u", "a", 1), row("u", "c", 2)]);
        let items: Vec<&str> = data.sequences[0]
            .iter()
            .map(|s| data.item_ids[s.item as usize - 1].as_str())
            .collect();
        assert_eq!(items, ["a", "b", "c"]);
    }

    #[test]
    fn leave_one_out_holds_out_the_last_two() {
        let data = Dataset::from_events(vec![
            row("u", "a", 1),
            row("u", "b", 2),
            row("u", "c", 3),
            row("v", "a", 1),
            row("v", "b", 2),
        ]);
        let split = Split::leave_one_out(&data);
        assert_eq!(split.train_len, [1, 2]);
        assert_eq!(
            split.valid,
            [Case {
                user: 0,
                prefix: 1,
                target: 2
            }]
        );
        assert_eq!(
            split.test,
            [Case {
                user: 0,
                prefix: 2,
                target: 3
            }]
        );
    }
}
