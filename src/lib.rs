//! # recd: an online recommendation service for web shops
//!
//! How the parts fit (see DESIGN.md for the contract):
//!
//! - [`http`]: the REST API. Collectors POST events, the storefront asks
//!   for recommendations and profiles, ops scrape `/metrics`. Every request
//!   passes limits (body size, time, requests in flight) and an API-key check.
//! - [`ingest`]: what an event is and the one validation that the API and
//!   [`import`] share.
//! - [`store`]: the only code that speaks SQL, over PostgreSQL or an embedded
//!   SQLite file. An event is acknowledged only after its row is committed;
//!   `event_id` makes retries idempotent.
//! - [`config`]: layered settings with secrets that never print.
//! - [`demo`]: a generated shop for `recd serve --demo` and the benchmarks.
//! - [`model`]: the candle sequence network, its training and evaluation,
//!   and the snapshot served in plain Rust.
//! - [`recommend`]: ranking at request time from the user's newest events,
//!   filters, cold start, similar and popular items.
//! - [`profile`]: a shopper's profile: counts, sessions, favourite
//!   categories, RFM scores, churn risk, segment.
//! - [`trainer`]: the background retrainer (leader lock, gate, publish) and
//!   the pickup of new snapshots by every replica.
//! - [`server`]: `recd serve` itself: wait for the store, load the last
//!   snapshot, bind, serve, stop gracefully.

pub mod config;
pub mod demo;
pub mod http;
pub mod import;
pub mod ingest;
pub mod model;
pub mod profile;
pub mod recommend;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod trainer;
