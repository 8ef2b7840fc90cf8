//! The served model in plain Rust: f32 arrays out of a training run, an LSTM
//! step, catalogue scoring and a top-N, with no candle on the request path.
//! Saved as safetensors with the item ids and metrics as JSON metadata; it
//! holds no user data.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use super::data::Step;
use super::knn::Neighbours;
use super::metrics::Metrics;

/// Event type codes the model embeds (`EventType::ALL`), plus padding.
pub const KINDS: usize = 8;
pub const PAD_KIND: u8 = 7;

/// What a snapshot says about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotMeta {
    pub version: String,
    /// When training finished (RFC 3339).
    pub trained_at: String,
    /// Newest event timestamp (ms) the model learned from.
    pub cutoff_ms: i64,
    pub events: u64,
    pub users: u64,
    pub items: u64,
    /// Held-out figures of this training.
    pub metrics: ModelMetrics,
    /// The weight of co-occurrence scores added to the network's.
    pub knn_weight: f32,
    pub kind: SnapshotKind,
    /// The store's newest arrival number among the events learned from:
    /// later arrivals are the new events a retraining waits for.
    #[serde(default)]
    pub last_seq: i64,
    /// When the training from scratch this model descends from ran (ms; 0:
    /// unknown, as for snapshots before continued training).
    #[serde(default)]
    pub scratch_at_ms: i64,
    /// The version whose weights this training continued from; none for a
    /// training from scratch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continued_from: Option<String>,
    /// Churn prediction measured on this training's window, with the
    /// classifier fitted there; none when the window was too small.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub churn: Option<crate::churn::ChurnReport>,
}

/// What a snapshot ranks with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// Trained weights are present.
    Network,
    /// The data was too small to train: popularity and co-occurrence only.
    Popular,
}

/// The held-out figures of one training, each method on the same test
/// cases.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelMetrics {
    pub model: Metrics,
    pub popular: Metrics,
    pub item_knn: Metrics,
    pub test_users: u64,
}

/// The network's weights, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    pub dim: usize,
    pub hidden: usize,
    /// (items + 1) x dim; row 0 is padding.
    pub item_emb: Vec<f32>,
    /// KINDS x dim.
    pub kind_emb: Vec<f32>,
    /// 4h x dim, gates in the order input, forget, cell, output.
    pub w_ih: Vec<f32>,
    /// 4h x h.
    pub w_hh: Vec<f32>,
    /// 4h.
    pub b: Vec<f32>,
    /// dim x h.
    pub proj: Vec<f32>,
    /// dim.
    pub proj_b: Vec<f32>,
    /// items + 1.
    pub item_bias: Vec<f32>,
}

/// A user's recurrent state after some events.
#[derive(Debug, Clone, PartialEq)]
pub struct UserState {
    pub h: Vec<f32>,
    pub c: Vec<f32>,
    /// Events run through the network.
    pub steps: u32,
}

#[derive(Debug, Clone)]
pub struct ModelSnapshot {
    pub meta: SnapshotMeta,
    /// Dense index - 1 -> item id.
    pub item_ids: Vec<String>,
    pub index: HashMap<String, u32>,
    pub weights: Option<Weights>,
    /// Interaction counts per dense index (0 for padding).
    pub popularity: Vec<f32>,
    pub neighbours: Neighbours,
    /// Each item's coordinates on the first two principal components of
    /// the item embeddings, `items x 2` in dense order without padding
    /// (`crate::model::projection`): the dashboard's map. Made when the
    /// model is trained (`project`); none for a popular-only snapshot and
    /// for snapshots saved before it existed.
    pub projection: Option<Vec<f32>>,
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// out[r] += dot(m[r], v) for a row-major matrix with `v.len()` columns.
#[inline(always)]
fn matvec_add(m: &[f32], v: &[f32], out: &mut [f32]) {
    let cols = v.len();
    for (row, o) in m.chunks_exact(cols).zip(out.iter_mut()) {
        *o += dot(row, v);
    }
}

/// A dot product written so that the compiler vectorises it.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

impl Weights {
    /// Weights of the served shape with every value drawn from `value`,
    /// and the padding row and bias zero: for tests and benchmarks that
    /// need a network without training one.
    pub fn from_fn(items: usize, dim: usize, hidden: usize, mut value: impl FnMut() -> f32) -> Weights {
        let mut values = |len: usize| (0..len).map(|_| value()).collect::<Vec<f32>>();
        let mut item_emb = values((items + 1) * dim);
        item_emb[..dim].fill(0.0);
        let mut item_bias = values(items + 1);
        item_bias[0] = 0.0;
        Weights {
            dim,
            hidden,
            item_emb,
            kind_emb: values(KINDS * dim),
            w_ih: values(4 * hidden * dim),
            w_hh: values(4 * hidden * hidden),
            b: values(4 * hidden),
            proj: values(dim * hidden),
            proj_b: values(dim),
            item_bias,
        }
    }

    pub fn items(&self) -> usize {
        self.item_bias.len() - 1
    }

    /// One LSTM step: the state after `step`. Allocates nothing (scratch
    /// buffers are kept per thread).
    pub fn advance(&self, state: &mut UserState, step: Step) {
        thread_local! {
            static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
        }
        SCRATCH.with(|scratch| {
            let (x, gates) = &mut *scratch.borrow_mut();
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features the function is built for.
                    unsafe { advance_avx2(self, state, step, x, gates) };
                    return;
                }
            }
            self.advance_with(state, step, x, gates);
        });
    }

    /// The step's arithmetic; the same floats with or without AVX2 (the
    /// sums keep their order and Rust forms no fused multiply-adds).
    #[inline(always)]
    fn advance_with(&self, state: &mut UserState, step: Step, x: &mut Vec<f32>, gates: &mut Vec<f32>) {
        let (d, h) = (self.dim, self.hidden);
        let item = step.item as usize;
        let kind = (step.kind as usize).min(KINDS - 1);
        let (e, t) = (
            &self.item_emb[item * d..(item + 1) * d],
            &self.kind_emb[kind * d..(kind + 1) * d],
        );
        x.clear();
        x.extend(e.iter().zip(t).map(|(e, t)| e + t));
        gates.clear();
        gates.extend_from_slice(&self.b);
        matvec_add(&self.w_ih, x, gates);
        matvec_add(&self.w_hh, &state.h, gates);
        for k in 0..h {
            let i = sigmoid(gates[k]);
            let f = sigmoid(gates[h + k]);
            let g = gates[2 * h + k].tanh();
            let o = sigmoid(gates[3 * h + k]);
            let c = f * state.c[k] + i * g;
            state.c[k] = c;
            state.h[k] = o * c.tanh();
        }
        state.steps += 1;
    }

    pub fn initial_state(&self) -> UserState {
        UserState {
            h: vec![0.0; self.hidden],
            c: vec![0.0; self.hidden],
            steps: 0,
        }
    }

    /// The query vector whose dot product with an item's embedding scores it.
    pub fn query(&self, state: &UserState) -> Vec<f32> {
        let mut q = self.proj_b.clone();
        matvec_add(&self.proj, &state.h, &mut q);
        q
    }

    /// The network's scores of every dense index after a history (its
    /// newest `max_len` events).
    pub fn score_history(&self, history: &[Step], max_len: usize, scores: &mut Vec<f32>) {
        let mut state = self.initial_state();
        for &step in &history[history.len().saturating_sub(max_len)..] {
            self.advance(&mut state, step);
        }
        scores.clear();
        scores.resize(self.items() + 1, 0.0);
        self.score_into(&self.query(&state), scores);
    }

    /// The score of one dense index: dot(q, item i) + bias i.
    pub fn score_one(&self, q: &[f32], item: u32) -> f32 {
        let i = item as usize;
        dot(&self.item_emb[i * self.dim..(i + 1) * self.dim], q) + self.item_bias[i]
    }

    /// scores[i] = dot(q, item i) + bias i, for every dense index (0 too).
    /// Uses AVX2 when the CPU has it (the binary is built for any x86-64).
    pub fn score_into(&self, q: &[f32], scores: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has the features the function is built for.
                unsafe { score_rows_avx2(&self.item_emb, &self.item_bias, q, scores) };
                return;
            }
        }
        score_rows(&self.item_emb, &self.item_bias, q, scores);
    }
}

#[inline(always)]
fn score_rows(emb: &[f32], bias: &[f32], q: &[f32], scores: &mut [f32]) {
    for ((row, bias), s) in emb.chunks_exact(q.len()).zip(bias).zip(scores.iter_mut()) {
        *s = dot(row, q) + bias;
    }
}

/// `Weights::advance_with` compiled with AVX2 and FMA enabled.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn advance_avx2(w: &Weights, state: &mut UserState, step: Step, x: &mut Vec<f32>, gates: &mut Vec<f32>) {
    w.advance_with(state, step, x, gates);
}

/// `score_rows` compiled with AVX2 and FMA enabled.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn score_rows_avx2(emb: &[f32], bias: &[f32], q: &[f32], scores: &mut [f32]) {
    score_rows(emb, bias, q, scores);
}

/// The N best (index, score) of `scores`, best first, skipping index 0 and
/// whatever `skip` says; ties go to the lower index.
pub fn top_n(scores: &[f32], n: usize, mut skip: impl FnMut(u32) -> bool) -> Vec<(u32, f32)> {
    use std::cmp::Ordering;
    use std::collections::BinaryHeap;
    #[derive(PartialEq)]
    struct Entry(f32, u32);
    impl Eq for Entry {}
    impl Ord for Entry {
        // A min-heap on score (the worst kept entry on top); among equal
        // scores the higher index is worse.
        fn cmp(&self, other: &Self) -> Ordering {
            other.0.total_cmp(&self.0).then(self.1.cmp(&other.1))
        }
    }
    impl PartialOrd for Entry {
        fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
            Some(self.cmp(other))
        }
    }
    if n == 0 {
        return Vec::new();
    }
    let mut heap = BinaryHeap::with_capacity(n + 1);
    // The score to beat: the worst kept once n are kept. NaN and -inf never
    // beat it, so they are never kept.
    let mut threshold = f32::NEG_INFINITY;
    for (i, &s) in scores.iter().enumerate().skip(1) {
        let beats = s > threshold;
        if !beats || skip(i as u32) {
            continue;
        }
        heap.push(Entry(s, i as u32));
        if heap.len() > n {
            heap.pop();
        }
        if heap.len() == n {
            threshold = heap.peek().map_or(f32::NEG_INFINITY, |e| e.0);
        }
    }
    let mut best: Vec<(u32, f32)> = heap.into_iter().map(|e| (e.1, e.0)).collect();
    best.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    best
}

/// Snapshots say `recd-snapshot-N` in their metadata: N is the layout of
/// their tensors and metadata. A service reads every format up to its own
/// (so an upgraded replica serves what an older one published) and refuses
/// a newer one with [`NewerFormat`] (so an older replica keeps serving its
/// model while a newer one publishes during a rolling upgrade).
const FORMAT_PREFIX: &str = "recd-snapshot-";
/// The format this build writes, and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;

/// A snapshot written by a newer recd than this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("snapshot format {found} is newer than this recd reads ({reads})")]
pub struct NewerFormat {
    pub found: u32,
    pub reads: u32,
}

impl ModelSnapshot {
    pub fn new(
        meta: SnapshotMeta,
        item_ids: Vec<String>,
        weights: Option<Weights>,
        popularity: Vec<f32>,
        neighbours: Neighbours,
    ) -> Self {
        let index = item_ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i as u32 + 1))
            .collect();
        ModelSnapshot {
            meta,
            item_ids,
            index,
            weights,
            popularity,
            neighbours,
            projection: None,
        }
    }

    /// Projects the item embeddings to 2-D (PCA) for the dashboard's map;
    /// nothing without a network. CPU work of about a second per million
    /// items: call where training runs.
    pub fn project(&mut self) {
        self.projection = self.weights.as_ref().map(|w| {
            let items = w.items();
            super::projection::principal_plane(&w.item_emb[w.dim..], items, w.dim)
        });
    }

    /// The item at dense index `index`'s point on the map, if the snapshot
    /// has one.
    pub fn point(&self, index: u32) -> Option<(f32, f32)> {
        let at = (index as usize).checked_sub(1)? * 2;
        let p = self.projection.as_ref()?.get(at..at + 2)?;
        Some((p[0], p[1]))
    }

    pub fn items(&self) -> usize {
        self.item_ids.len()
    }

    pub fn item_id(&self, index: u32) -> &str {
        &self.item_ids[index as usize - 1]
    }

    pub fn item_index(&self, id: &str) -> Option<u32> {
        self.index.get(id).copied()
    }

    /// The state after a user's events (only the newest `max_len` count).
    pub fn user_state(&self, history: &[Step], max_len: usize) -> Option<UserState> {
        let weights = self.weights.as_ref()?;
        let mut state = weights.initial_state();
        for &step in &history[history.len().saturating_sub(max_len)..] {
            weights.advance(&mut state, step);
        }
        Some(state)
    }

    /// Scores of every dense index for a user with this history and state:
    /// the network's (when trained) plus weighted co-occurrence.
    pub fn score_user(&self, history: &[Step], state: Option<&UserState>, scores: &mut Vec<f32>) {
        scores.clear();
        scores.resize(self.items() + 1, 0.0);
        match (self.weights.as_ref(), state) {
            (Some(weights), Some(state)) => {
                let q = weights.query(state);
                weights.score_into(&q, scores);
                if self.meta.knn_weight > 0.0 {
                    self.neighbours.add_scores(history, self.meta.knn_weight, scores);
                }
            }
            _ => {
                self.neighbours.add_scores(history, 1.0, scores);
                // Popularity breaks ties among items co-occurrence does not reach.
                let total: f32 = self.popularity.iter().sum::<f32>().max(1.0);
                for (s, p) in scores.iter_mut().zip(&self.popularity) {
                    *s += 1e-3 * p / total;
                }
            }
        }
    }

    /// Item-to-item similarity by the learned embeddings (cosine), or by
    /// co-occurrence when no network was trained.
    pub fn similar_scores(&self, item: u32, scores: &mut Vec<f32>) {
        scores.clear();
        scores.resize(self.items() + 1, 0.0);
        if let Some(w) = &self.weights {
            let d = w.dim;
            let row = |i: usize| &w.item_emb[i * d..(i + 1) * d];
            let norm = |v: &[f32]| dot(v, v).sqrt().max(1e-12);
            let q = row(item as usize);
            let qn = norm(q);
            for (i, s) in scores.iter_mut().enumerate().skip(1) {
                let r = row(i);
                *s = dot(q, r) / (qn * norm(r));
            }
        }
        for (j, sim) in self.neighbours.of(item) {
            scores[j as usize] += sim;
        }
        scores[item as usize] = f32::NEG_INFINITY;
    }

    /// Serialises to safetensors bytes with the metadata as JSON.
    pub fn to_bytes(&self) -> anyhow::Result<Vec<u8>> {
        self.to_bytes_as(FORMAT_VERSION)
    }

    /// The snapshot's bytes, labelled with format `version` (tests of what
    /// another recd would write).
    #[doc(hidden)]
    pub fn to_bytes_as(&self, version: u32) -> anyhow::Result<Vec<u8>> {
        let mut tensors: Vec<(String, Vec<u8>, Vec<usize>, Dtype)> = Vec::new();
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let u32s = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        tensors.push((
            "popularity".into(),
            f32s(&self.popularity),
            vec![self.popularity.len()],
            Dtype::F32,
        ));
        let nb = &self.neighbours;
        tensors.push((
            "knn.offsets".into(),
            u32s(&nb.offsets),
            vec![nb.offsets.len()],
            Dtype::U32,
        ));
        tensors.push(("knn.items".into(), u32s(&nb.items), vec![nb.items.len()], Dtype::U32));
        tensors.push((
            "knn.weights".into(),
            f32s(&nb.weights),
            vec![nb.weights.len()],
            Dtype::F32,
        ));
        if let Some(w) = &self.weights {
            let (n, d, h) = (w.item_bias.len(), w.dim, w.hidden);
            tensors.push(("item_emb".into(), f32s(&w.item_emb), vec![n, d], Dtype::F32));
            tensors.push(("kind_emb".into(), f32s(&w.kind_emb), vec![KINDS, d], Dtype::F32));
            tensors.push(("lstm.w_ih".into(), f32s(&w.w_ih), vec![4 * h, d], Dtype::F32));
            tensors.push(("lstm.w_hh".into(), f32s(&w.w_hh), vec![4 * h, h], Dtype::F32));
            tensors.push(("lstm.b".into(), f32s(&w.b), vec![4 * h], Dtype::F32));
            tensors.push(("proj.w".into(), f32s(&w.proj), vec![d, h], Dtype::F32));
            tensors.push(("proj.b".into(), f32s(&w.proj_b), vec![d], Dtype::F32));
            tensors.push(("item_bias".into(), f32s(&w.item_bias), vec![n], Dtype::F32));
        }
        // An optional tensor: readers that do not know it pass it over, so
        // the format stays the same.
        if let Some(p) = &self.projection {
            tensors.push(("projection".into(), f32s(p), vec![p.len() / 2, 2], Dtype::F32));
        }
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(name, bytes, shape, dtype)| Ok((name.clone(), TensorView::new(*dtype, shape.clone(), bytes)?)))
            .collect::<Result<_, safetensors::SafeTensorError>>()?;
        let mut metadata = HashMap::new();
        metadata.insert("format".to_owned(), format!("{FORMAT_PREFIX}{version}"));
        metadata.insert("meta".to_owned(), serde_json::to_string(&self.meta)?);
        metadata.insert("item_ids".to_owned(), serde_json::to_string(&self.item_ids)?);
        Ok(safetensors::serialize(views, Some(metadata))?)
    }

    pub fn from_bytes(bytes: &[u8]) -> anyhow::Result<Self> {
        use anyhow::Context;
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)?;
        let tensors = safetensors::SafeTensors::deserialize(bytes)?;
        let metadata = header.metadata().clone().context("snapshot without metadata")?;
        let found: u32 = metadata
            .get("format")
            .and_then(|f| f.strip_prefix(FORMAT_PREFIX))
            .and_then(|n| n.parse().ok())
            .context("not a recd snapshot")?;
        if found > FORMAT_VERSION {
            return Err(NewerFormat {
                found,
                reads: FORMAT_VERSION,
            }
            .into());
        }
        let meta: SnapshotMeta = serde_json::from_str(metadata.get("meta").context("no meta")?)?;
        let item_ids: Vec<String> = serde_json::from_str(metadata.get("item_ids").context("no item ids")?)?;
        let f32s = |name: &str| -> anyhow::Result<Vec<f32>> {
            let t = tensors
                .tensor(name)
                .with_context(|| format!("snapshot without {name}"))?;
            anyhow::ensure!(t.dtype() == Dtype::F32, "{name}: not f32");
            Ok(t.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let u32s = |name: &str| -> anyhow::Result<Vec<u32>> {
            let t = tensors
                .tensor(name)
                .with_context(|| format!("snapshot without {name}"))?;
            anyhow::ensure!(t.dtype() == Dtype::U32, "{name}: not u32");
            Ok(t.data()
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let n = item_ids.len() + 1;
        let weights = if tensors.names().contains(&"item_emb") {
            let shape = tensors.tensor("item_emb")?.shape().to_vec();
            let dim = shape[1];
            let hidden = tensors.tensor("lstm.w_hh")?.shape()[1];
            let w = Weights {
                dim,
                hidden,
                item_emb: f32s("item_emb")?,
                kind_emb: f32s("kind_emb")?,
                w_ih: f32s("lstm.w_ih")?,
                w_hh: f32s("lstm.w_hh")?,
                b: f32s("lstm.b")?,
                proj: f32s("proj.w")?,
                proj_b: f32s("proj.b")?,
                item_bias: f32s("item_bias")?,
            };
            anyhow::ensure!(shape[0] == n && w.item_bias.len() == n, "item count mismatch");
            Some(w)
        } else {
            None
        };
        let neighbours = Neighbours {
            offsets: u32s("knn.offsets")?,
            items: u32s("knn.items")?,
            weights: f32s("knn.weights")?,
        };
        anyhow::ensure!(neighbours.offsets.len() == n + 1, "co-occurrence table mismatch");
        // Older snapshots have none (their map is empty until the next
        // training); one of another size is not this snapshot's.
        let projection = if tensors.names().contains(&"projection") {
            Some(f32s("projection")?).filter(|p| p.len() == 2 * (n - 1))
        } else {
            None
        };
        let mut snapshot = ModelSnapshot::new(meta, item_ids, weights, f32s("popularity")?, neighbours);
        snapshot.projection = projection;
        Ok(snapshot)
    }
}

/// Small snapshots with random weights, for the unit tests of the layers
/// that rank with a model (no training needed).
#[cfg(test)]
pub(crate) mod testing {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// A snapshot over items `i1..=iN`, with a network when `network` (else
    /// popularity and co-occurrence only); `pairs` co-occur.
    pub(crate) fn snapshot(items: usize, network: bool, pairs: &[(u32, u32)], seed: u64) -> ModelSnapshot {
        let mut rng = StdRng::seed_from_u64(seed);
        let weights = network.then(|| Weights::from_fn(items, 8, 8, || rng.gen_range(-0.5f32..0.5)));
        let meta = SnapshotMeta {
            version: format!("test-{seed}"),
            trained_at: "2026-01-01T00:00:00.000Z".to_owned(),
            cutoff_ms: 0,
            events: 0,
            users: 0,
            items: items as u64,
            metrics: ModelMetrics::default(),
            knn_weight: 0.0,
            kind: if network {
                SnapshotKind::Network
            } else {
                SnapshotKind::Popular
            },
            last_seq: 0,
            scratch_at_ms: 0,
            continued_from: None,
            churn: None,
        };
        let sequences: Vec<[Step; 2]> = pairs
            .iter()
            .map(|&(a, b)| [Step { item: a, kind: 0 }, Step { item: b, kind: 0 }])
            .collect();
        let neighbours = Neighbours::build(items, sequences.iter().map(|s| &s[..]), 10);
        let popularity = (0..=items)
            .map(|i| if i == 0 { 0.0 } else { (items - i + 1) as f32 })
            .collect();
        ModelSnapshot::new(
            meta,
            (1..=items).map(|i| format!("i{i}")).collect(),
            weights,
            popularity,
            neighbours,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_n_orders_and_skips() {
        let scores = [9.0, 0.5, 3.0, 3.0, f32::NEG_INFINITY, 7.0, 1.0];
        assert_eq!(top_n(&scores, 3, |_| false), [(5, 7.0), (2, 3.0), (3, 3.0)]);
        assert_eq!(top_n(&scores, 2, |i| i == 5), [(2, 3.0), (3, 3.0)]);
        assert_eq!(top_n(&scores, 10, |_| false).len(), 5);
    }

    /// The map travels with the snapshot as an extra tensor, which leaves
    /// every other tensor as it was (older readers look tensors up by
    /// name); a snapshot without it loads without a map.
    #[test]
    fn the_projection_is_an_optional_extra_tensor() {
        let mut with = testing::snapshot(30, true, &[(1, 2)], 5);
        let without = with.clone();
        with.project();
        let projection = with.projection.clone().expect("a network has a map");
        assert_eq!(projection.len(), 60);
        assert!(projection.iter().all(|v| v.is_finite()));
        assert!(with.point(1).is_some() && with.point(0).is_none() && with.point(31).is_none());

        let (bytes, plain) = (with.to_bytes().unwrap(), without.to_bytes().unwrap());
        let loaded = ModelSnapshot::from_bytes(&bytes).unwrap();
        assert_eq!(loaded.projection.as_deref(), Some(&projection[..]));
        assert_eq!(ModelSnapshot::from_bytes(&plain).unwrap().projection, None);

        let (a, b) = (
            safetensors::SafeTensors::deserialize(&bytes).unwrap(),
            safetensors::SafeTensors::deserialize(&plain).unwrap(),
        );
        let mut names: Vec<&str> = b.names();
        names.push("projection");
        names.sort_unstable();
        let mut extended: Vec<&str> = a.names();
        extended.sort_unstable();
        assert_eq!(extended, names);
        for name in b.names() {
            assert_eq!(a.tensor(name).unwrap().data(), b.tensor(name).unwrap().data(), "{name}");
        }
        assert_eq!(a.tensor("projection").unwrap().shape(), [30, 2]);

        let mut popular = testing::snapshot(30, false, &[], 5);
        popular.project();
        assert_eq!(popular.projection, None);
    }

    #[test]
    fn dot_matches_naive() {
        let a: Vec<f32> = (0..67).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..67).map(|i| 1.0 - i as f32 * 0.01).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
    }
}
