//! recd's model: a candle sequence network (item and event-type embeddings,
//! an LSTM, tied output embeddings with an item bias) trained on each
//! shopper's events, the popular and co-occurrence baselines, the
//! evaluation protocol (docs/evaluation.md), and the snapshot that the
//! service scores with in plain Rust.

pub mod ann;
pub mod data;
pub mod eval;
pub mod knn;
pub mod metrics;
pub mod net;
pub mod ops;
pub mod optim;
pub mod projection;
pub mod simd;
pub mod snapshot;
pub mod suggest;
pub mod train;

pub use crate::domain::EventRow;
pub use data::{load_events_csv, Dataset, Split, Step};
pub use eval::{evaluate_events, train_and_evaluate, train_and_evaluate_from, EvalReport};
pub use metrics::Metrics;
pub use snapshot::{top_n, ModelSnapshot, SnapshotMeta, UserState};
pub use train::TrainConfig;
