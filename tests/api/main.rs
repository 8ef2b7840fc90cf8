//! Black-box tests of recd's HTTP API, each on SQLite and on Postgres.

mod helpers;

mod auth;
mod browse;
mod categories;
mod churn;
mod dashboard;
mod dashstats;
mod deidentify;
mod events;
mod items;
mod limits;
mod model_map;
mod openapi;
mod ops;
mod process;
mod profile;
mod ratings;
mod replicas;
mod retention;
mod segments;
mod serving;
mod store_down;
mod training;
mod users;
