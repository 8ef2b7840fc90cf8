//! What the storefront asks for: a user's recommendations, items similar to
//! one, popular items.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, Invalid, Problem};
use super::openapi::Id;
use super::{ApiResult, AppState};
use crate::clock::now_ms;
use crate::domain::Impression;
use crate::ingest::check_id;
use crate::recommend::catalogue::{CatalogueFields, Fields};
use crate::recommend::{Exclude, Ranked, Request, Serving, HISTORY_LIMIT};

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(recommendations))
        .routes(routes!(similar))
        .routes(routes!(popular))
}

// The query parameters as documented. The handlers read them from a map
// themselves, so that every invalid one is named in one 422; these types
// only describe them. Unknown parameters are ignored.

/// The parameters of `GET /v1/users/{user_id}/recommendations`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct RecommendationsQuery {
    /// How many items.
    #[param(minimum = 1, maximum = 100, default = 10)]
    n: Option<u32>,
    /// Only items whose `categories` contain it.
    #[param(min_length = 1, max_length = 256)]
    category: Option<String>,
    /// `seen`: every item in the user's newest 1,000 events; `purchased`:
    /// items they bought (among those events); `none`: nothing.
    #[param(inline)]
    exclude: Option<ExcludeParam>,
    /// Comma-separated item ids to leave out as well (the one on screen,
    /// the cart), at most 1,000.
    exclude_items: Option<String>,
    /// Add a `reason` to each item (`1`, `0` and an empty value are read as
    /// well).
    #[param(default = false)]
    explain: Option<bool>,
    /// Catalogue fields to return with each item, comma-separated: any of
    /// `title`, `price`, `categories`, `attributes` (from memory, no
    /// query per item). Default: none.
    #[param(example = "title,price")]
    fields: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum ExcludeParam {
    Seen,
    Purchased,
    None,
}

/// The parameters of `GET /v1/items/{item_id}/similar`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct SimilarQuery {
    /// How many items.
    #[param(minimum = 1, maximum = 100, default = 10)]
    n: Option<u32>,
    /// Only items in this category.
    #[param(min_length = 1, max_length = 256)]
    category: Option<String>,
    /// Catalogue fields to return with each item, comma-separated: any of
    /// `title`, `price`, `categories`, `attributes` (from memory, no
    /// query per item). Default: none.
    #[param(example = "title,price")]
    fields: Option<String>,
}

/// The parameters of `GET /v1/popular`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct PopularQuery {
    /// How many items.
    #[param(minimum = 1, maximum = 100, default = 10)]
    n: Option<u32>,
    /// Only items in this category.
    #[param(min_length = 1, max_length = 256)]
    category: Option<String>,
    /// How far back from the newest event in the store: `7d`, `12h`,
    /// `30m`, `250ms`, a bare number of seconds; `0` = all events; at most
    /// 100 years. Default: `popular_window` (30 days).
    window: Option<String>,
    /// Catalogue fields to return with each item, comma-separated: any of
    /// `title`, `price`, `categories`, `attributes` (from memory, no
    /// query per item). Default: none.
    #[param(example = "title,price")]
    fields: Option<String>,
}

/// An item of a list, with its score (comparable only within one answer).
#[derive(Serialize, ToSchema)]
struct ItemScore {
    item_id: String,
    score: f64,
    /// The catalogue fields asked for with `fields=`; none unless asked.
    #[serde(flatten)]
    #[schema(value_type = CatalogueFields)]
    fields: Map<String, Value>,
}

/// A list of items: similar or popular.
#[derive(Serialize, ToSchema)]
struct ScoredItems {
    /// The served model's version; `null` while no model is published.
    model_version: Option<String>,
    items: Vec<ItemScore>,
}

const MAX_N: i64 = 100;
const MAX_EXCLUDED_ITEMS: usize = 1000;

type Params = HashMap<String, String>;

/// `n`: 1..=100, default 10.
fn count(params: &Params, errors: &mut Vec<Invalid>) -> usize {
    usize::try_from(super::error::page_limit(params, "n", 10, MAX_N, errors)).unwrap_or(10)
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

/// `fields`: catalogue fields to add to each item.
fn wanted_fields(params: &Params, errors: &mut Vec<Invalid>) -> Fields {
    let Some(list) = params.get("fields") else {
        return Fields::default();
    };
    Fields::parse(list).unwrap_or_else(|unknown| {
        errors.push(Invalid::new(
            "fields",
            format!(
                "unknown field {unknown:?}: must be a comma-separated list of {}",
                Fields::NAMES.join(", ")
            ),
        ));
        Fields::default()
    })
}

/// Adds the wanted catalogue fields to each item, from the catalogue in
/// memory (one lock for the whole answer).
fn add_fields<'a>(
    state: &AppState,
    wanted: Fields,
    items: impl Iterator<Item = (&'a str, &'a mut Map<String, Value>)>,
) {
    if !wanted.any() {
        return;
    }
    let catalogue = state.serving.catalogue.view();
    for (item_id, fields) in items {
        *fields = catalogue.fields(item_id, wanted);
    }
}

fn path_id(field: &str, id: &str) -> ApiResult<()> {
    check_id(field, id).map_err(|e| ApiError::invalid(vec![e.into()]))
}

fn parse_request(params: &Params) -> ApiResult<(Request, Fields)> {
    let mut errors = Vec::new();
    let n = count(params, &mut errors);
    let fields = wanted_fields(params, &mut errors);
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
    Ok((
        Request {
            n,
            category,
            exclude,
            exclude_items,
            explain,
        },
        fields,
    ))
}

/// A shopper's next items, ranked at request time from their newest events.
///
/// Personalized from the user's newest events when the served model knows
/// one of their items; the popular list (the cold start) otherwise. An
/// unknown user is not an error. Unavailable and deleted items are never
/// returned; the answer may hold fewer than `n` items. Each answer is one
/// impression, with a new `recommendation_id` to send back on the events it
/// leads to.
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/recommendations",
    tag = "recommendations",
    params(("user_id" = Id, Path, description = "The shopper"), RecommendationsQuery),
    responses(
        (status = 200, description = "The recommendations", body = RecommendationsBody),
        (status = 422, description = "`invalid-fields`: an invalid parameter, or a `user_id` that is not a valid id",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn recommendations(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
    Query(params): Query<Params>,
) -> ApiResult<Json<RecommendationsBody>> {
    let started = Instant::now();
    path_id("user_id", &user_id)?;
    let (request, wanted) = parse_request(&params)?;
    let events = state
        .serving
        .histories
        .get(&state.store, &user_id, HISTORY_LIMIT)
        .await?;
    state.serving.prepare_category_filter(request.category.as_deref());
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
    let mut ranked = state.serving.recommend(
        model.as_deref(),
        &user_id,
        &events,
        &request,
        popular.as_deref().map_or(&[][..], Vec::as_slice),
    );
    add_fields(
        &state,
        wanted,
        ranked.items.iter_mut().map(|i| (i.item_id.as_str(), &mut i.fields)),
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
#[derive(Serialize, ToSchema)]
struct RecommendationsBody {
    user_id: String,
    /// This answer's id (32 hex digits, time-ordered): send it back on the
    /// events it leads to.
    #[schema(pattern = "^[0-9a-f]{32}$")]
    recommendation_id: String,
    #[serde(flatten)]
    ranked: Ranked,
}

/// Items like this one, for a product page.
///
/// For an item the served model knows: learned similarity plus
/// co-occurrence. For an item it does not know yet (or while no model is
/// published): the popular items that share one of its categories. The item
/// itself, unavailable and deleted items are never listed.
#[utoipa::path(
    get,
    path = "/v1/items/{item_id}/similar",
    tag = "recommendations",
    params(("item_id" = Id, Path, description = "The item"), SimilarQuery),
    responses(
        (status = 200, description = "The list (possibly empty)", body = ScoredItems),
        (status = 404, description = "`not-found`: the item is not in the catalogue, or is deleted",
            body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid-fields`: invalid `n`, `category`, `fields` or `item_id`",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn similar(
    State(state): State<AppState>,
    Path(item_id): Path<String>,
    Query(params): Query<Params>,
) -> ApiResult<Json<ScoredItems>> {
    let started = Instant::now();
    path_id("item_id", &item_id)?;
    let mut errors = Vec::new();
    let n = count(&params, &mut errors);
    let category = category(&params, &mut errors);
    let wanted = wanted_fields(&params, &mut errors);
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let Some(item) = state.store.get_item(&item_id).await? else {
        return Err(ApiError::NotFound(format!("no item {item_id:?}")));
    };
    state.serving.prepare_category_filter(category.as_deref());
    let model = state.serving.model();
    let found = model
        .as_deref()
        .and_then(|m| state.serving.similar(m, &item_id, n, category.as_deref()));
    let mut items: Vec<ItemScore> = match found {
        Some(items) => items
            .into_iter()
            .map(|s| ItemScore {
                item_id: s.item_id,
                score: f64::from(s.score),
                fields: Map::new(),
            })
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
                .map(|(id, score)| ItemScore {
                    item_id: id.clone(),
                    score: *score,
                    fields: Map::new(),
                })
                .collect()
        }
    };
    add_fields(
        &state,
        wanted,
        items.iter_mut().map(|i| (i.item_id.as_str(), &mut i.fields)),
    );
    metrics::histogram!("recd_recommendation_duration_seconds", "strategy" => "similar")
        .record(started.elapsed().as_secs_f64());
    Ok(Json(ScoredItems {
        model_version: model.map(|m| m.meta.version.clone()),
        items,
    }))
}

/// The most interacted-with items.
///
/// Each event in the window counts 7 / (7 + its age in days), age measured
/// from the newest event in the store; ties are broken by item id.
/// Unavailable and deleted items are left out.
#[utoipa::path(
    get,
    path = "/v1/popular",
    tag = "recommendations",
    params(PopularQuery),
    responses(
        (status = 200, description = "The list (possibly empty)", body = ScoredItems),
        (status = 422, description = "`invalid-fields`: invalid `n`, `category`, `window` or `fields`",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn popular(State(state): State<AppState>, Query(params): Query<Params>) -> ApiResult<Json<ScoredItems>> {
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
    let wanted = wanted_fields(&params, &mut errors);
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let list = state.serving.popular.get(&state.store, window).await?;
    state.serving.prepare_category_filter(category.as_deref());
    let mut items: Vec<ItemScore> = {
        let catalogue = state.serving.catalogue.view();
        list.iter()
            .filter(|(id, _)| catalogue.allows(id, category.as_deref()))
            .take(n)
            .map(|(id, score)| ItemScore {
                item_id: id.clone(),
                score: *score,
                fields: Map::new(),
            })
            .collect()
    };
    add_fields(
        &state,
        wanted,
        items.iter_mut().map(|i| (i.item_id.as_str(), &mut i.fields)),
    );
    metrics::histogram!("recd_recommendation_duration_seconds", "strategy" => "popular_list")
        .record(started.elapsed().as_secs_f64());
    Ok(Json(ScoredItems {
        model_version: state.serving.version(),
        items,
    }))
}
