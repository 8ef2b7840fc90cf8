//! What the storefront asks for: a user's recommendations, items similar to
//! one, popular items.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::error::{ApiError, Invalid};
use super::{ApiResult, AppState};
use crate::clock::now_ms;
use crate::domain::Impression;
use crate::ingest::check_id;
use crate::recommend::{Exclude, Ranked, Request, Serving, HISTORY_LIMIT};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/users/{user_id}/recommendations", get(recommendations))
        .route("/v1/items/{item_id}/similar", get(similar))
        .route("/v1/popular", get(popular))
}

const MAX_N: usize = 100;
const MAX_EXCLUDED_ITEMS: usize = 1000;

type Params = HashMap<String, String>;

/// `n`: 1..=100, default 10.
fn count(params: &Params, errors: &mut Vec<Invalid>) -> usize {
    match params.get("n") {
        None => 10,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_N).contains(&n) => n,
            _ => {
                errors.push(Invalid::new("n", format!("must be a whole number from 1 to {MAX_N}")));
                10
            }
        },
    }
}

fn category(params: &Params, errors: &mut Vec<Invalid>) -> Option<String> {
    let category = params.get("category")?;
    if category.is_empty() || category.chars().count() > 256 {
        errors.push(Invalid::new("category", "must be 1 to 256 characters"));
        return None;
    }
    Some(category.clone())
}

fn flag(params: &Params, name: &str, errors: &mut Vec<Invalid>) -> bool {
    match params.get(name).map(String::as_str) {
        None | Some("false" | "0") => false,
        Some("true" | "1" | "") => true,
        Some(_) => {
            errors.push(Invalid::new(name, "must be true or false"));
            false
        }
    }
}

fn path_id(field: &str, id: &str) -> ApiResult<()> {
    check_id(field, id).map_err(|e| ApiError::invalid(vec![e.into()]))
}

fn parse_request(params: &Params) -> ApiResult<Request> {
    let mut errors = Vec::new();
    let n = count(params, &mut errors);
    let category = category(params, &mut errors);
    let explain = flag(params, "explain", &mut errors);
    let exclude = match params.get("exclude") {
        None => Exclude::Seen,
        Some(text) => Exclude::parse(text).unwrap_or_else(|| {
            errors.push(Invalid::new("exclude", "must be seen, purchased or none"));
            Exclude::Seen
        }),
    };
    let exclude_items: Vec<String> = params
        .get("exclude_items")
        .map(|list| list.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default();
    if exclude_items.len() > MAX_EXCLUDED_ITEMS {
        errors.push(Invalid::new(
            "exclude_items",
            format!("at most {MAX_EXCLUDED_ITEMS} item ids"),
        ));
    }
    if let Some(bad) = exclude_items.iter().find_map(|id| check_id("exclude_items", id).err()) {
        errors.push(bad.into());
    }
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    Ok(Request {
        n,
        category,
        exclude,
        exclude_items,
        explain,
    })
}

/// `GET /v1/users/{user_id}/recommendations`: personalized from the user's
/// newest events at request time; popular for users the model cannot place.
async fn recommendations(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
    Query(params): Query<Params>,
) -> ApiResult<Json<RecommendationsBody>> {
    let started = Instant::now();
    path_id("user_id", &user_id)?;
    let request = parse_request(&params)?;
    let events = state
        .serving
        .histories
        .get(&state.store, &user_id, HISTORY_LIMIT)
        .await?;
    let model = state.serving.model();
    let popular = if Serving::is_cold(model.as_deref(), &events) {
        Some(
            state
                .serving
                .popular
                .get(&state.store, state.settings.popular_window)
                .await?,
        )
    } else {
        None
    };
    let ranked = state.serving.recommend(
        model.as_deref(),
        &user_id,
        &events,
        &request,
        popular.as_deref().map_or(&[][..], Vec::as_slice),
    );
    let recommendation_id = uuid::Uuid::now_v7().simple().to_string();
    state.serving.impressions.record(Impression {
        recommendation_id: recommendation_id.clone(),
        model_version: ranked.model_version.clone(),
        item_ids: ranked.items.iter().map(|i| i.item_id.clone()).collect(),
        created_at: now_ms(),
    });
    metrics::histogram!("recd_recommendation_duration_seconds", "strategy" => ranked.strategy.name())
        .record(started.elapsed().as_secs_f64());
    Ok(Json(RecommendationsBody {
        user_id,
        recommendation_id,
        ranked,
    }))
}

/// The recommendations answer: the ranking with who asked and its id,
/// serialised directly (no `Value` tree).
#[derive(serde::Serialize)]
struct RecommendationsBody {
    user_id: String,
    recommendation_id: String,
    #[serde(flatten)]
    ranked: Ranked,
}

/// `GET /v1/items/{item_id}/similar`: 404 for an item the catalogue does
/// not have (or deleted); an item the model does not know yet gets the
/// popular items of its categories.
async fn similar(
    State(state): State<AppState>,
    Path(item_id): Path<String>,
    Query(params): Query<Params>,
) -> ApiResult<Json<Value>> {
    let started = Instant::now();
    path_id("item_id", &item_id)?;
    let mut errors = Vec::new();
    let n = count(&params, &mut errors);
    let category = category(&params, &mut errors);
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let Some(item) = state.store.get_item(&item_id).await? else {
        return Err(ApiError::NotFound(format!("no item {item_id:?}")));
    };
    let model = state.serving.model();
    let found = model
        .as_deref()
        .and_then(|m| state.serving.similar(m, &item_id, n, category.as_deref()));
    let items: Vec<Value> = match found {
        Some(items) => items
            .into_iter()
            .map(|s| json!({"item_id": s.item_id, "score": s.score}))
            .collect(),
        None => {
            let list = state
                .serving
                .popular
                .get(&state.store, state.settings.popular_window)
                .await?;
            let catalogue = state.serving.catalogue.view();
            list.iter()
                .filter(|(id, _)| *id != item_id)
                .filter(|(id, _)| catalogue.allows(id, category.as_deref()))
                .filter(|(id, _)| {
                    item.categories.is_empty() || catalogue.categories(id).iter().any(|c| item.categories.contains(c))
                })
                .take(n)
                .map(|(id, score)| json!({"item_id": id, "score": score}))
                .collect()
        }
    };
    metrics::histogram!("recd_recommendation_duration_seconds", "strategy" => "similar")
        .record(started.elapsed().as_secs_f64());
    Ok(Json(json!({
        "model_version": model.map(|m| m.meta.version.clone()),
        "items": items,
    })))
}

/// `GET /v1/popular`: most interacted-with items within `window` of the
/// newest event, recency-weighted.
async fn popular(State(state): State<AppState>, Query(params): Query<Params>) -> ApiResult<Json<Value>> {
    let started = Instant::now();
    let mut errors = Vec::new();
    let n = count(&params, &mut errors);
    let category = category(&params, &mut errors);
    let window = match params.get("window") {
        None => state.settings.popular_window,
        Some(text) => match crate::config::parse_duration(text) {
            Ok(w) if w.is_zero() => None,
            Ok(w) if w <= Duration::from_secs(100 * 365 * 86400) => Some(w),
            _ => {
                errors.push(Invalid::new(
                    "window",
                    "must be a duration such as 7d, 12h or 30m (0 = all)",
                ));
                None
            }
        },
    };
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let list = state.serving.popular.get(&state.store, window).await?;
    let items: Vec<Value> = {
        let catalogue = state.serving.catalogue.view();
        list.iter()
            .filter(|(id, _)| catalogue.allows(id, category.as_deref()))
            .take(n)
            .map(|(id, score)| json!({"item_id": id, "score": score}))
            .collect()
    };
    metrics::histogram!("recd_recommendation_duration_seconds", "strategy" => "popular_list")
        .record(started.elapsed().as_secs_f64());
    Ok(Json(json!({
        "model_version": state.serving.version(),
        "items": items,
    })))
}
