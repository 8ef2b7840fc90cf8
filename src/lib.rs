//! # recd: an online recommendation service for web shops
//!
//! How the parts fit, from the bottom up (the docs/ folder holds the
//! contract: the API, operations, the model, evaluation):
//!
//! - [`domain`] and [`clock`]: the words every layer shares (an event, an
//!   item, an impression, a training run) and the server's clock.
//! - [`store`]: the only code that speaks SQL, over PostgreSQL or an
//!   embedded SQLite file, the replicas' locks and announcements included.
//!   An event is acknowledged only after its row is committed; `event_id`
//!   makes retries idempotent.
//! - [`ingest`]: the one validation of events that the API and [`import`]
//!   share.
//! - [`model`]: the candle sequence network, its training and evaluation,
//!   and the snapshot served in plain Rust. It takes the events it is given.
//! - [`profile`]: a shopper's profile: counts, sessions, favourite
//!   categories, RFM scores, churn risk, segment. Pure computation.
//! - [`ratings`]: shopper satisfaction: rating summaries per item, per
//!   category and per shopper (means, counts, a 30-day trend). Pure
//!   computation over sums the store makes.
//! - [`recommend`]: ranking at request time from the user's newest events:
//!   the state cache, the index, filters, cold start, similar and popular.
//! - [`trainer`]: the retrainer: scheduling and leadership, the training
//!   pipeline, the gate.
//! - [`app`]: the owner of a serving process's state and lifecycle: the
//!   store, settings, serving state and trainer; starts the background
//!   tasks once and stops them on shutdown.
//! - [`http`]: the REST API over an [`app::App`]. Every request passes
//!   limits (body size, time, requests in flight) and an API-key check.
//! - [`server`]: `recd serve`, `train` and `eval`: open the store, build the
//!   app, bind, serve, stop gracefully.
//! - [`config`]: layered settings with secrets that never print;
//!   [`telemetry`]: logs and metrics; [`demo`]: a generated shop.

pub mod app;
pub mod churn;
pub mod clock;
pub mod config;
pub mod demo;
pub mod domain;
pub mod http;
pub mod import;
pub mod ingest;
pub mod model;
pub mod profile;
pub mod ratings;
pub mod recommend;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod trainer;
