//! The synthetic shop: a seeded, deterministic catalogue of items in
//! categories and a year of shopping sessions, written as PostgreSQL `COPY`
//! text rows for recd's own tables, and events for `POST /v1/events`.
//!
//! Items `item000000..`: item i is in category `cat{i % categories}`; within
//! a category a few items take most of the traffic (rank drawn as r³), and
//! so do a few categories (r²). A session belongs to one user (the first
//! `users` sessions each bring a new user, later ones return half the time
//! to a frequent shopper, a quarter of users taking most sessions); it
//! starts in the user's favourite category most of the time, views items
//! there and now and then drifts to a neighbouring or another category; a
//! view is sometimes followed by an add-to-cart and more rarely a purchase
//! (the item's price as value). About 5 events a session, 20 s to 3 min
//! apart; sessions start in order over the year before `end_ms`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use recd::domain::{EventType, NewEvent};

/// The shop's shape.
#[derive(Clone, Copy, Debug)]
pub struct ShopSize {
    pub events: u64,
    pub users: u64,
    pub items: u64,
    pub categories: u64,
    pub seed: u64,
}

pub fn item_id(i: u64) -> String {
    format!("item{i:06}")
}

pub fn user_id(u: u64) -> String {
    format!("user{u:07}")
}

pub fn category_name(c: u64) -> String {
    format!("cat{c:03}")
}

/// A bijection of 0..n (n > 0) that spreads neighbours apart, so that the
/// frequent shoppers are not the first user ids.
fn spread(i: u64, n: u64) -> u64 {
    // An odd multiplier coprime with n is a bijection mod n.
    let mut m = 0x9E37_79B9_7F4A_7C15u64 % n.max(1);
    while gcd(m, n) != 1 {
        m += 1;
    }
    ((i as u128 * m as u128) % n as u128) as u64
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A cheap deterministic hash (splitmix64).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The price of item `i`, 5.00 to 204.99.
pub fn price(i: u64) -> f64 {
    5.0 + (mix(i) % 20_000) as f64 / 100.0
}

/// One generated event.
pub struct Event {
    pub user: u64,
    pub item: u64,
    pub kind: EventType,
    pub ts: i64,
    pub session: u64,
}

impl Event {
    pub fn value(&self) -> Option<f64> {
        (self.kind == EventType::Purchase).then(|| price(self.item))
    }

    /// As the API or `recd import` would store it (timestamped; no event id
    /// yet).
    pub fn new_event(&self) -> NewEvent {
        NewEvent {
            event_id: None,
            user_id: user_id(self.user),
            item_id: item_id(self.item),
            kind: self.kind,
            value: self.value(),
            ts: self.ts,
            timestamped: true,
            session_id: Some(format!("s{}", self.session)),
            recommendation_id: None,
        }
    }
}

/// The sessions of the shop, event by event, in order of session start.
pub struct Sessions {
    size: ShopSize,
    rng: StdRng,
    start_ms: i64,
    span_ms: f64,
    emitted: u64,
    session: u64,
    user: u64,
    category: u64,
    item: Option<u64>,
    ts: i64,
    in_session: bool,
}

impl Sessions {
    /// `size.events` events over the `days` days before `end_ms`; `first_session`
    /// numbers the sessions (another stream of the same shop starts where
    /// the first ended).
    pub fn new(size: ShopSize, end_ms: i64, days: f64, stream: u64, first_session: u64) -> Sessions {
        let span_ms = days * 86_400_000.0;
        Sessions {
            size,
            rng: StdRng::seed_from_u64(size.seed ^ mix(stream)),
            start_ms: end_ms - span_ms as i64,
            span_ms,
            emitted: 0,
            session: first_session,
            user: 0,
            category: 0,
            item: None,
            ts: 0,
            in_session: false,
        }
    }

    fn skewed(&mut self, n: u64, power: i32) -> u64 {
        let r: f64 = self.rng.gen();
        ((r.powi(power) * n as f64) as u64).min(n - 1)
    }

    fn skewed_category(&mut self) -> u64 {
        spread(self.skewed(self.size.categories, 2), self.size.categories)
    }

    fn favourite_category(&self, user: u64) -> u64 {
        // Skewed like the categories' traffic, fixed per user.
        let r = (mix(user ^ self.size.seed) % 1_000_000) as f64 / 1_000_000.0;
        spread(
            ((r * r * self.size.categories as f64) as u64).min(self.size.categories - 1),
            self.size.categories,
        )
    }

    fn item_in(&mut self, category: u64) -> u64 {
        let c = self.size.categories;
        let per_category = self.size.items.div_ceil(c);
        let mut rank = self.skewed(per_category, 3);
        while category + c * rank >= self.size.items {
            rank -= 1;
        }
        category + c * rank
    }

    fn start_session(&mut self) {
        self.session += 1;
        let users = self.size.users;
        self.user = if self.session <= users {
            // Everyone comes once...
            spread(self.session - 1, users)
        } else if self.rng.gen_bool(0.5) {
            // ... frequent shoppers come back ...
            spread(self.skewed(users / 4 + 1, 2), users)
        } else {
            // ... and anyone may.
            self.rng.gen_range(0..users)
        };
        self.category = if self.rng.gen_bool(0.7) {
            self.favourite_category(self.user)
        } else {
            self.skewed_category()
        };
        self.item = None;
        let progress = self.emitted as f64 / self.size.events as f64;
        self.ts = self.start_ms + (progress * self.span_ms) as i64 + self.rng.gen_range(0..60_000);
        self.in_session = true;
    }
}

impl Iterator for Sessions {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        if self.emitted == self.size.events {
            return None;
        }
        if !self.in_session {
            self.start_session();
        } else {
            self.ts += self.rng.gen_range(20_000..180_000);
            if self.rng.gen_bool(0.15) {
                // Drift: to a neighbouring category, or anywhere.
                let c = self.size.categories;
                self.category = if self.rng.gen_bool(0.5) {
                    (self.category + if self.rng.gen_bool(0.5) { 1 } else { c - 1 }) % c
                } else {
                    self.skewed_category()
                };
            }
        }
        let roll: f64 = self.rng.gen();
        let (kind, item) = match self.item {
            Some(item) if roll < 0.03 => (EventType::Purchase, item),
            Some(item) if roll < 0.10 => (EventType::AddToCart, item),
            _ => (EventType::View, self.item_in(self.category)),
        };
        self.item = Some(item);
        // About 5 events a session.
        self.in_session = self.rng.gen_bool(0.8);
        self.emitted += 1;
        Some(Event {
            user: self.user,
            item,
            kind,
            ts: self.ts,
            session: self.session,
        })
    }
}

/// The catalogue as `COPY items (item_id, title, categories, price,
/// available, attributes, deleted, updated_at)` text rows. Stamped 100 ms
/// apart up to a minute before `now_ms`, as a catalogue grows (a replica's
/// catalogue poll rereads the 10 s before the newest change).
pub fn catalogue_rows(size: &ShopSize, now_ms: i64, out: &mut Vec<u8>) {
    use std::io::Write;
    for i in 0..size.items {
        let c = i % size.categories;
        let stamp = now_ms - 60_000 - (size.items - i) as i64 * 100;
        let _ = writeln!(
            out,
            "{}\tItem {i} of {}\t[\"{}\"]\t{:.2}\tt\t{{}}\tf\t{stamp}",
            item_id(i),
            category_name(c),
            category_name(c),
            price(i)
        );
    }
}

/// One event as a `COPY events (seq, event_id, user_id, item_id, kind,
/// value, ts, session_id, recommendation_id, received_at)` text row, with
/// the event id `recd import` derives.
pub fn event_row(seq: u64, event: &Event, received_at: i64, out: &mut Vec<u8>) {
    use std::io::Write;
    let new = event.new_event();
    let id = recd::ingest::derived_event_id(&new);
    let _ = write!(
        out,
        "{seq}\t{id}\t{}\t{}\t{}\t",
        new.user_id,
        new.item_id,
        new.kind.code()
    );
    match new.value {
        Some(v) => {
            let _ = write!(out, "{v}");
        }
        None => out.extend_from_slice(b"\\N"),
    }
    let _ = writeln!(
        out,
        "\t{}\t{}\t\\N\t{received_at}",
        new.ts,
        new.session_id.as_deref().unwrap_or_default()
    );
}

/// One event as the JSON `POST /v1/events` takes, with a unique event id.
pub fn event_json(event: &Event, event_id: &str, out: &mut String) {
    use std::fmt::Write;
    let when = recd::clock::format_timestamp(event.ts);
    let _ = write!(
        out,
        r#"{{"event_id":"{event_id}","user_id":"{}","item_id":"{}","type":"{}","timestamp":"{when}","session_id":"s{}""#,
        user_id(event.user),
        item_id(event.item),
        event.kind.name(),
        event.session
    );
    if let Some(v) = event.value() {
        let _ = write!(out, r#","value":{v}"#);
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_and_in_range() {
        let size = ShopSize {
            events: 5000,
            users: 300,
            items: 2000,
            categories: 20,
            seed: 1,
        };
        let a: Vec<(u64, u64, i64)> = Sessions::new(size, 1_000_000_000_000, 365.0, 0, 0)
            .map(|e| (e.user, e.item, e.ts))
            .collect();
        let b: Vec<(u64, u64, i64)> = Sessions::new(size, 1_000_000_000_000, 365.0, 0, 0)
            .map(|e| (e.user, e.item, e.ts))
            .collect();
        assert_eq!(a, b);
        assert_eq!(a.len(), 5000);
        assert!(a.iter().all(|&(u, i, _)| u < 300 && i < 2000));
    }
}
