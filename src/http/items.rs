//! The catalogue: `PUT/GET/DELETE /v1/items/{item_id}`, bulk `POST /v1/items`
//! and `GET /v1/items`, a search a page at a time.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, Invalid, Problem};
use super::events::{read_body, MAX_BATCH};
use super::openapi::Id;
use super::{parse_json, ApiResult, AppState};
use crate::clock::{format_timestamp, now_ms};
use crate::domain::{Item, RatingTotals};
use crate::ingest::{check_id, FieldError};
use crate::model::suggest::SuggestedCategory;
use crate::ratings::{summarise, window_starts, RatingSummary};
use crate::store::ItemSearch;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(put_many, search))
        .routes(routes!(get_one, put_one, delete_one))
        .routes(routes!(stats))
}

/// The fields of an item as sent, with the `item_id` field given: absent
/// fields take their defaults, `null` means absent, any other field is a
/// 422. The handlers validate the JSON themselves ([`parse_item`]) to name
/// every bad field; these types only describe it.
macro_rules! item_in {
    ($(#[$meta:meta])* $name:ident { $(#[$id_meta:meta])* item_id: $id:ty }) => {
        #[derive(Deserialize, ToSchema)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        $(#[$meta])*
        pub(super) struct $name {
            $(#[$id_meta])*
            item_id: $id,
            /// Default `null`.
            #[schema(max_length = 1000)]
            title: Option<String>,
            /// Default `[]`. The first is the item's primary category, which
            /// the model learns from.
            #[schema(value_type = Option<Vec<Id>>, max_items = 100)]
            categories: Option<Vec<String>>,
            /// Default `null`.
            #[schema(minimum = 0)]
            price: Option<f64>,
            /// Default `true`; unavailable items are never recommended.
            available: Option<bool>,
            /// Default `{}`: any JSON object, stored and returned as given.
            #[schema(value_type = Option<Object>)]
            attributes: Option<Map<String, Value>>,
            /// Allowed and ignored (what `GET` adds), so that an item read
            /// can be sent back changed.
            #[schema(value_type = Option<Vec<Object>>)]
            suggested_categories: Option<Value>,
        }
    };
}

item_in!(
    /// An item as sent to `PUT /v1/items/{item_id}`.
    #[schema(example = json!({"title": "Trail shoe", "categories": ["shoes", "sale"], "price": 89.5, "attributes": {"brand": "Acme"}}))]
    ItemIn {
        /// Allowed and ignored: the path names the item.
        item_id: Option<String>
    }
);

item_in!(
    /// One item of a `POST /v1/items` batch.
    BatchItem {
        #[schema(value_type = Id)]
        item_id: String
    }
);

/// A catalogue sync: up to 1,000 items, all or nothing.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub(super) struct ItemBatch {
    #[schema(min_items = 1, max_items = 1000)]
    items: Vec<BatchItem>,
}

/// An item as stored, with the categories its neighbours suggest.
#[derive(Serialize, ToSchema)]
struct ItemOut {
    #[serde(flatten)]
    item: Item,
    /// For an item without categories that the served model knows: up to 3
    /// categories of its nearest neighbours (by learned similarity and
    /// co-occurrence), best first, each with its share of their
    /// similarity-weighted vote. Empty for an item with categories, one the
    /// model does not know, or without a model.
    suggested_categories: Vec<SuggestedCategory>,
}

/// The items as stored.
#[derive(Serialize, ToSchema)]
struct Items {
    items: Vec<Item>,
}

const MAX_TITLE_CHARS: usize = 1000;
const MAX_CATEGORIES: usize = 100;
const FIELDS: [&str; 7] = [
    "item_id",
    "title",
    "categories",
    "price",
    "available",
    "attributes",
    "suggested_categories",
];

/// Validates an item body; absent fields take their defaults.
pub fn parse_item(item_id: &str, body: &Value) -> Result<Item, Vec<FieldError>> {
    let Some(obj) = body.as_object() else {
        return Err(vec![FieldError::new("item", "must be a JSON object")]);
    };
    let mut errors = Vec::new();
    if let Err(e) = check_id("item_id", item_id) {
        errors.push(e);
    }
    for key in obj.keys().filter(|k| !FIELDS.contains(&k.as_str())) {
        errors.push(FieldError::new(
            key,
            "unknown field; an item has title, categories, price, available, attributes",
        ));
    }
    let title = match obj.get("title") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) if t.chars().count() <= MAX_TITLE_CHARS => Some(t.clone()),
        Some(Value::String(_)) => {
            errors.push(FieldError::new(
                "title",
                format!("must be at most {MAX_TITLE_CHARS} characters"),
            ));
            None
        }
        Some(_) => {
            errors.push(FieldError::new("title", "must be a string"));
            None
        }
    };
    let categories = match obj.get("categories") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) if list.len() <= MAX_CATEGORIES => {
            let mut categories = Vec::with_capacity(list.len());
            for c in list {
                match c.as_str().map(|c| (c, check_id("categories", c))) {
                    Some((c, Ok(()))) => categories.push(c.to_owned()),
                    Some((_, Err(e))) => errors.push(e),
                    None => errors.push(FieldError::new("categories", "must be an array of strings")),
                }
            }
            categories
        }
        Some(_) => {
            errors.push(FieldError::new(
                "categories",
                format!("must be an array of at most {MAX_CATEGORIES} strings"),
            ));
            Vec::new()
        }
    };
    let price = match obj.get("price") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(p) if p >= 0.0 && p.is_finite() => Some(p),
            _ => {
                errors.push(FieldError::new("price", "must not be negative"));
                None
            }
        },
        Some(_) => {
            errors.push(FieldError::new("price", "must be a number"));
            None
        }
    };
    let available = match obj.get("available") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            errors.push(FieldError::new("available", "must be true or false"));
            true
        }
    };
    let attributes = match obj.get("attributes") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(map)) => map.clone(),
        Some(_) => {
            errors.push(FieldError::new("attributes", "must be a JSON object"));
            Map::new()
        }
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Item {
        item_id: item_id.to_owned(),
        title,
        categories,
        price,
        available,
        attributes,
    })
}

/// Creates or replaces one item.
///
/// A `PUT` is a replacement, not a patch: absent fields take their
/// defaults. A deleted item is brought back.
#[utoipa::path(
    put,
    path = "/v1/items/{item_id}",
    tag = "catalogue",
    params(("item_id" = Id, Path, description = "The item")),
    request_body = ItemIn,
    responses(
        (status = 200, description = "Stored; the body is the stored item", body = Item),
        (status = 400, description = "`malformed-request`: the body is not JSON",
            body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid-fields`: the path id or a field is invalid, or the body has an unknown field or is not an object",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn put_one(
    State(state): State<AppState>,
    Path(item_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Item>> {
    let body: Value = parse_json(&read_body(body)?)?;
    let item = parse_item(&item_id, &body)
        .map_err(|errors| ApiError::invalid(errors.into_iter().map(Invalid::from).collect()))?;
    state.store.put_items(std::slice::from_ref(&item), now_ms()).await?;
    state.serving.catalogue.refresh(&state.store).await?;
    Ok(Json(item))
}

/// Creates or replaces up to 1,000 items at once (a catalogue sync).
///
/// All or nothing: if any item is invalid, nothing is stored and the 422
/// names each bad field with its `index`.
#[utoipa::path(
    post,
    path = "/v1/items",
    tag = "catalogue",
    request_body = ItemBatch,
    responses(
        (status = 200, description = "All stored; the body lists the stored items", body = Items),
        (status = 400, description = "`malformed-request`: the body is not JSON, or not an object with an `items` array",
            body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid-fields`: `items` is empty or longer than 1,000, or an item is invalid; nothing stored",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn put_many(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> ApiResult<Json<Items>> {
    let body: Value = parse_json(&read_body(body)?)?;
    let Some(Value::Array(raw)) = body.get("items") else {
        return Err(ApiError::BadRequest(
            "the body must be an object with an \"items\" array".to_owned(),
        ));
    };
    if raw.is_empty() || raw.len() > MAX_BATCH {
        return Err(ApiError::field(
            "items",
            format!("must hold 1 to {MAX_BATCH} items, got {}", raw.len()),
        ));
    }
    let mut items = Vec::with_capacity(raw.len());
    let mut errors = Vec::new();
    for (index, raw) in raw.iter().enumerate() {
        let item_id = match raw.get("item_id") {
            Some(Value::String(id)) => id.as_str(),
            Some(_) => {
                errors.push(Invalid::at(index, FieldError::new("item_id", "must be a string")));
                continue;
            }
            None => {
                errors.push(Invalid::at(index, FieldError::new("item_id", "is required")));
                continue;
            }
        };
        match parse_item(item_id, raw) {
            Ok(item) => items.push(item),
            Err(errs) => errors.extend(errs.into_iter().map(|e| Invalid::at(index, e))),
        }
    }
    // A catalogue sync is all or nothing: a half-applied one is harder to
    // reason about than a clear 422.
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    state.store.put_items(&items, now_ms()).await?;
    state.serving.catalogue.refresh(&state.store).await?;
    Ok(Json(Items { items }))
}

/// One item.
#[utoipa::path(
    get,
    path = "/v1/items/{item_id}",
    tag = "catalogue",
    params(("item_id" = Id, Path, description = "The item")),
    responses(
        (status = 200, description = "The item, with the categories suggested by shoppers' behaviour when it has none", body = ItemOut),
        (status = 404, description = "`not-found`: the item was never seen, or is deleted",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_one(State(state): State<AppState>, Path(item_id): Path<String>) -> ApiResult<Json<ItemOut>> {
    let item = state
        .store
        .get_item(&item_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no item {item_id:?}")))?;
    let suggested_categories = if item.categories.is_empty() {
        state.serving.suggested_categories(&item_id)
    } else {
        Vec::new()
    };
    Ok(Json(ItemOut {
        item,
        suggested_categories,
    }))
}

/// Items per page unless `limit` says otherwise.
const DEFAULT_PAGE: i64 = 20;
/// The most items a page may ask for.
const MAX_PAGE: i64 = 100;
/// The longest `q`, in characters (as a title).
const MAX_QUERY_CHARS: usize = MAX_TITLE_CHARS;

/// The parameters of `GET /v1/items`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct SearchQuery {
    /// Items whose id starts with it or whose title contains it, ignoring
    /// case (on SQLite, of ASCII letters only). Empty or absent: every item.
    #[param(max_length = 1000)]
    q: Option<String>,
    /// Only items with this category among theirs (exactly).
    #[param(min_length = 1, max_length = 256)]
    category: Option<String>,
    /// Items per page.
    #[param(minimum = 1, maximum = 100, default = 20)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page; absent for the first.
    cursor: Option<String>,
}

/// A page of items.
#[derive(Serialize, ToSchema)]
struct ItemPage {
    /// In item id order, each as `GET /v1/items/{item_id}` gives it.
    items: Vec<ItemOut>,
    /// Pass as `cursor` for the next page; `null` on the last.
    next_cursor: Option<String>,
}

/// The search, validated: every bad parameter named in one 422.
fn parse_search(params: &HashMap<String, String>) -> ApiResult<(Option<String>, Option<String>, String, i64)> {
    let mut errors = Vec::new();
    let q = params.get("q").filter(|q| !q.is_empty()).cloned();
    if q.as_ref().is_some_and(|q| q.chars().count() > MAX_QUERY_CHARS) {
        errors.push(Invalid::new(
            "q",
            format!("must be at most {MAX_QUERY_CHARS} characters"),
        ));
    }
    let category = params.get("category").cloned();
    if category
        .as_ref()
        .is_some_and(|c| c.is_empty() || c.chars().count() > 256)
    {
        errors.push(Invalid::new("category", "must be 1 to 256 characters"));
    }
    let limit = super::error::page_limit(params, "limit", DEFAULT_PAGE, MAX_PAGE, &mut errors);
    // The cursor is the last id of the previous page, in hex.
    let after = match params.get("cursor") {
        None => String::new(),
        Some(cursor) => hex::decode(cursor)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| {
                errors.push(Invalid::new("cursor", "not a cursor this API gave"));
                String::new()
            }),
    };
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    Ok((q, category, after, limit))
}

/// Searches the catalogue, a page at a time.
///
/// Live items (not deleted) whose id starts with `q` or whose title
/// contains it, ignoring case, and that have `category` among their
/// categories; both optional. In item id order; each page's `next_cursor`
/// continues after its last item, so paging through lists every match
/// once.
#[utoipa::path(
    get,
    path = "/v1/items",
    tag = "catalogue",
    params(SearchQuery),
    responses(
        (status = 200, description = "A page of matching items", body = ItemPage),
        (status = 422, description = "`invalid-fields`: a bad `q`, `category`, `limit` or `cursor`",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn search(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<ItemPage>> {
    let (q, category, after, limit) = parse_search(&params)?;
    // One more than asked says whether a next page exists.
    let mut items = state
        .store
        .search_items(&ItemSearch {
            text: q.as_deref(),
            category: category.as_deref(),
            after: &after,
            limit: limit + 1,
        })
        .await?;
    let page = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = items.len() > page;
    items.truncate(page);
    let next_cursor = if more {
        items.last().map(|i| hex::encode(&i.item_id))
    } else {
        None
    };
    let items = items
        .into_iter()
        .map(|item| {
            let suggested_categories = if item.categories.is_empty() {
                state.serving.suggested_categories(&item.item_id)
            } else {
                Vec::new()
            };
            ItemOut {
                item,
                suggested_categories,
            }
        })
        .collect();
    Ok(Json(ItemPage { items, next_cursor }))
}

/// Marks the item deleted.
///
/// A deleted item reads as 404, is never recommended nor listed, and stays
/// deleted when later events name it, until it is `PUT` again. Its events
/// stay.
#[utoipa::path(
    delete,
    path = "/v1/items/{item_id}",
    tag = "catalogue",
    params(("item_id" = Id, Path, description = "The item")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "`not-found`: there is no such live item",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn delete_one(State(state): State<AppState>, Path(item_id): Path<String>) -> ApiResult<StatusCode> {
    if state.store.delete_item(&item_id, now_ms()).await? {
        state.serving.catalogue.refresh(&state.store).await?;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("no item {item_id:?}")))
    }
}

/// Shopper satisfaction with an item and with its categories.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"item_id": "shoe-1", "as_of": "2025-03-02T12:00:00.000Z",
    "ratings": {"count": 3, "mean": 3.6667, "last_30_days": {"count": 2, "mean": 4.5},
                "previous_30_days": {"count": 1, "mean": 2.0}, "trend": 2.5},
    "categories_as_of": "2025-03-02T12:00:00.000Z",
    "categories": [{"category": "shoes", "ratings": {"count": 4, "mean": 3.5,
        "last_30_days": {"count": 2, "mean": 4.5}, "previous_30_days": {"count": 1, "mean": 2.0}, "trend": 2.5}}]}))]
pub(super) struct ItemStats {
    item_id: String,
    /// The newest event in the store, which the item's windows are measured
    /// back from; `null` when the store holds no event.
    as_of: Option<String>,
    /// The item's ratings.
    ratings: RatingSummary,
    /// The newest event in the store when the category figures were last
    /// computed in the background (their windows are measured back from
    /// it); `null` before the first computation, when every category shows
    /// no ratings.
    categories_as_of: Option<String>,
    /// One entry per category of the item, in the item's order.
    categories: Vec<CategoryStats>,
}

/// The ratings of every item in one category.
#[derive(Serialize, ToSchema)]
pub(super) struct CategoryStats {
    #[schema(value_type = Id)]
    category: String,
    ratings: RatingSummary,
}

/// Ratings of an item and of its categories: count, mean and the trend
/// over 30 days.
///
/// A user's repeated ratings of an item count once, with the newest.
/// Windows are measured back from the newest event in the store, not the
/// clock. The item's figures are read at once; the categories' are computed
/// in the background every `rating_stats_refresh` (60 s). How each number
/// is computed is in docs/api.md.
#[utoipa::path(
    get,
    path = "/v1/items/{item_id}/stats",
    tag = "catalogue",
    params(("item_id" = Id, Path, description = "The item")),
    responses(
        (status = 200, description = "The item's and its categories' rating figures", body = ItemStats),
        (status = 404, description = "`not-found`: the item was never seen, or is deleted",
            body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid-fields`: `item_id` is not a valid id",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn stats(State(state): State<AppState>, Path(item_id): Path<String>) -> ApiResult<Json<ItemStats>> {
    check_id("item_id", &item_id).map_err(|e| ApiError::invalid(vec![e.into()]))?;
    let store = &state.store;
    let Some(item) = store.get_item(&item_id).await? else {
        return Err(ApiError::NotFound(format!("no item {item_id:?}")));
    };
    // As the profile measures time: the newest event as the app keeps it,
    // the store asked only before the first background read.
    let as_of = match state.app.newest_event_ms() {
        Some(newest) => Some(newest),
        None => store.newest_event_ms().await?,
    };
    let totals = match as_of {
        Some(as_of) => {
            let (last_from, previous_from) = window_starts(as_of);
            store.item_ratings(&item_id, last_from, previous_from).await?
        }
        None => RatingTotals::default(),
    };
    let computed = state.app.category_ratings();
    let mut categories: Vec<CategoryStats> = Vec::with_capacity(item.categories.len());
    for category in item.categories {
        if categories.iter().any(|c| c.category == category) {
            continue;
        }
        let totals = computed
            .as_deref()
            .and_then(|c| c.by_category.get(&category))
            .copied()
            .unwrap_or_default();
        categories.push(CategoryStats {
            category,
            ratings: summarise(&totals),
        });
    }
    Ok(Json(ItemStats {
        item_id,
        as_of: as_of.map(format_timestamp),
        ratings: summarise(&totals),
        categories_as_of: computed.and_then(|c| c.as_of_ms).map(format_timestamp),
        categories,
    }))
}
