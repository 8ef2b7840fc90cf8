//! Profiles: `GET /v1/users/{user_id}/profile` (read).
//!
//! The handler fetches and `crate::profile` computes. Nothing of a user is
//! cached, so once erased a user's profile is 404 at once; only the
//! shop-wide quantiles (no single user's data) are kept, for a minute, since
//! they take a pass over every event.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Extension, Json, Router};
use tokio::sync::Mutex;

use super::error::ApiError;
use super::{ApiResult, AppState};
use crate::profile::{build_profile, Profile, ShopStats};
use crate::store::{Store, StoreError};

/// A profile reads at most the user's newest this many events.
pub const MAX_PROFILE_EVENTS: i64 = 10_000;
/// How long the shop-wide figures are reused before they are recomputed.
pub const SHOP_STATS_TTL: Duration = Duration::from_secs(60);

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/users/{user_id}/profile", get(profile))
        // One cache per app, so that apps on different stores (as in the
        // tests) never share figures.
        .layer(Extension(ShopStatsCache::default()))
}

/// The shop-wide figures and when they were computed. The lock is held while
/// they are recomputed, so concurrent requests wait for one query instead of
/// each running their own.
#[derive(Clone, Default)]
struct ShopStatsCache(Arc<Mutex<Option<Computed>>>);

struct Computed {
    at: Instant,
    stats: Arc<ShopStats>,
}

impl ShopStatsCache {
    async fn get(&self, store: &Store) -> ApiResult<Arc<ShopStats>> {
        let slot = Arc::clone(&self.0);
        let store = store.clone();
        // A task of its own: a request that times out meanwhile does not
        // throw the query's work away, the next one finds it done.
        let refresh = tokio::spawn(async move {
            let mut cached = slot.lock_owned().await;
            if let Some(computed) = cached.as_ref().filter(|c| c.at.elapsed() < SHOP_STATS_TTL) {
                return Ok::<_, StoreError>(Arc::clone(&computed.stats));
            }
            let stats = Arc::new(store.shop_stats().await?);
            *cached = Some(Computed {
                at: Instant::now(),
                stats: Arc::clone(&stats),
            });
            Ok(stats)
        });
        let stats = refresh
            .await
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("shop statistics task failed: {e}")))??;
        Ok(stats)
    }
}

/// The user's profile; 404 when the store holds no event of theirs.
async fn profile(
    State(state): State<AppState>,
    Extension(cache): Extension<ShopStatsCache>,
    Path(user_id): Path<String>,
) -> ApiResult<Json<Profile>> {
    let store = &state.store;
    let events = store.user_events(&user_id, MAX_PROFILE_EVENTS).await?;
    let not_found = || ApiError::NotFound(format!("no events of user {user_id:?}"));
    if events.is_empty() {
        return Err(not_found());
    }
    let item_ids: Vec<&str> = events
        .iter()
        .map(|e| e.item_id.as_str())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let categories = store.item_categories(&item_ids).await?;
    let shop = cache.get(store).await?;
    // Erased meanwhile, the store may be empty: the user's own events then
    // say how late it is.
    let as_of = store.newest_event_ms().await?.unwrap_or(i64::MIN);
    let profile = build_profile(&user_id, &events, &categories, &shop, as_of).ok_or_else(not_found)?;
    Ok(Json(profile))
}
