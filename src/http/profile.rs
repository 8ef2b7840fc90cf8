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
        .layer(Extension(Arc::new(ShopStatsCache::default())))
}

/// The shop-wide figures and when they were computed. The lock is held while
/// they are recomputed, so concurrent requests wait for one query instead of
/// each running their own.
#[derive(Default)]
struct ShopStatsCache(Mutex<Option<(Instant, Arc<ShopStats>)>>);

impl ShopStatsCache {
    async fn get(&self, store: &Store) -> Result<Arc<ShopStats>, StoreError> {
        let mut cached = self.0.lock().await;
        if let Some((computed, stats)) = cached.as_ref() {
            if computed.elapsed() < SHOP_STATS_TTL {
                return Ok(Arc::clone(stats));
            }
        }
        let stats = Arc::new(store.shop_stats().await?);
        *cached = Some((Instant::now(), Arc::clone(&stats)));
        Ok(stats)
    }
}

/// The user's profile; 404 when the store holds no event of theirs.
async fn profile(
    State(state): State<AppState>,
    Extension(cache): Extension<Arc<ShopStatsCache>>,
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
