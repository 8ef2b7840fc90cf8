//! The approximate-nearest-neighbour index of a served model with a large
//! catalogue: built on a thread of its own when the model is published
//! (every item is scored exactly until it is ready), cancelled when a newer
//! model replaces it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::Serialize;

use super::Serving;
use crate::model::ann::{AnnIndex, Vectors};
use crate::model::ModelSnapshot;

/// An index and the model version it indexes.
pub(super) struct ReadyIndex {
    pub(super) version: String,
    pub(super) index: AnnIndex,
}

/// The newest index build: its model version, its state, and its cancel
/// flag (set when a newer model replaces it).
#[derive(Default)]
pub(super) struct AnnState {
    version: String,
    state: IndexState,
    error: Option<String>,
    cancel: Arc<AtomicBool>,
}

/// How the served model ranks the catalogue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IndexKind {
    /// Every item is scored.
    #[default]
    Exact,
    /// An HNSW index proposes candidates, scored exactly.
    Approximate,
}

/// Where an approximate index is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IndexState {
    /// Being built; every item is scored until it is ready.
    #[default]
    Building,
    Ready,
    /// The build failed; every item is scored.
    Failed,
}

/// How the served model ranks the catalogue, for `GET /v1/model`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct IndexInfo {
    pub kind: IndexKind,
    /// For `approximate` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<IndexState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_seconds: Option<f64>,
    /// Bytes the ready index holds (graph and vectors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<usize>,
    /// The number format of the ready index's vectors (`f32` or `f16`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vectors: Option<Vectors>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Serving {
    pub(super) fn index_in_background(&self, snapshot: Arc<ModelSnapshot>) {
        let mut state = self.ann_state.lock().unwrap_or_else(|e| e.into_inner());
        state.cancel.store(true, Ordering::Relaxed);
        let wanted = snapshot.weights.is_some() && self.ann_settings.applies_to(snapshot.items());
        metrics::gauge!("recd_ann_ready").set(0.0);
        if !wanted {
            *state = AnnState::default();
            self.ann.store(None);
            return;
        }
        let cancel = Arc::new(AtomicBool::new(false));
        *state = AnnState {
            version: snapshot.meta.version.clone(),
            state: IndexState::Building,
            error: None,
            cancel: cancel.clone(),
        };
        drop(state);
        let (slot, status, settings) = (self.ann.clone(), self.ann_state.clone(), self.ann_settings);
        let spawned = std::thread::Builder::new().name("recd-ann".into()).spawn(move || {
            let version = snapshot.meta.version.clone();
            let Some(weights) = snapshot.weights.as_ref() else {
                return;
            };
            tracing::info!(
                version,
                items = snapshot.items(),
                "building the nearest-neighbour index"
            );
            let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                AnnIndex::build(weights, &settings, &cancel)
            }))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the index build panicked")));
            let mut state = status.lock().unwrap_or_else(|e| e.into_inner());
            if state.version != version || cancel.load(Ordering::Relaxed) {
                return;
            }
            match built {
                Ok(Some(index)) => {
                    tracing::info!(
                        version,
                        seconds = index.build_seconds,
                        mib = index.memory_bytes() >> 20,
                        "nearest-neighbour index ready"
                    );
                    metrics::gauge!("recd_ann_build_seconds").set(index.build_seconds);
                    metrics::gauge!("recd_ann_ready").set(1.0);
                    state.state = IndexState::Ready;
                    slot.store(Some(Arc::new(ReadyIndex { version, index })));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(version, error = %e, "the nearest-neighbour index failed; scoring every item");
                    metrics::counter!("recd_ann_build_failures_total").increment(1);
                    state.state = IndexState::Failed;
                    state.error = Some(format!("{e:#}"));
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the index build; scoring every item");
            let mut state = self.ann_state.lock().unwrap_or_else(|e| e.into_inner());
            state.state = IndexState::Failed;
            state.error = Some(e.to_string());
        }
    }

    /// Ranks `snapshot` through `index`, made elsewhere (stored with the
    /// snapshot), from now on; an older build in progress is cancelled.
    pub(super) fn use_index(&self, snapshot: &ModelSnapshot, index: AnnIndex) {
        let mut state = self.ann_state.lock().unwrap_or_else(|e| e.into_inner());
        state.cancel.store(true, Ordering::Relaxed);
        let version = snapshot.meta.version.clone();
        *state = AnnState {
            version: version.clone(),
            state: IndexState::Ready,
            error: None,
            cancel: Arc::new(AtomicBool::new(false)),
        };
        metrics::gauge!("recd_ann_build_seconds").set(index.build_seconds);
        metrics::gauge!("recd_ann_ready").set(1.0);
        self.ann.store(Some(Arc::new(ReadyIndex { version, index })));
    }

    /// The index of `model`, when one is ready.
    pub(super) fn index_of(&self, model: &ModelSnapshot) -> Option<Arc<ReadyIndex>> {
        self.ann.load_full().filter(|r| r.version == model.meta.version)
    }

    /// How the served model ranks the catalogue.
    pub fn index_info(&self) -> Option<IndexInfo> {
        let model = self.model()?;
        if model.weights.is_none() || !self.ann_settings.applies_to(model.items()) {
            return Some(IndexInfo {
                kind: IndexKind::Exact,
                ..IndexInfo::default()
            });
        }
        let ready = self.index_of(&model);
        let state = self.ann_state.lock().unwrap_or_else(|e| e.into_inner());
        let current = state.version == model.meta.version;
        Some(IndexInfo {
            kind: IndexKind::Approximate,
            state: Some(match (&ready, current) {
                (Some(_), _) => IndexState::Ready,
                (None, true) => state.state,
                (None, false) => IndexState::Building,
            }),
            build_seconds: ready.as_ref().map(|r| r.index.build_seconds),
            memory_bytes: ready.as_ref().map(|r| r.index.memory_bytes()),
            vectors: ready.as_ref().map(|r| r.index.vectors()),
            error: state.error.clone().filter(|_| current && ready.is_none()),
        })
    }
}
