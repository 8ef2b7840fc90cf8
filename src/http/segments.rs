//! Segments for marketing: `GET /v1/segments` (read) sizes every RFM
//! segment; `GET /v1/segments/{name}/users` and its CSV export
//! `GET /v1/segments/{name}/users.csv` (admin: they list shoppers) page
//! through a segment's members.
//!
//! Everything is read from the store's `user_segments` table, which a
//! background task fills every `segments_refresh` with the profile's own
//! code path (`crate::profile::score`); see `crate::app`.

use std::collections::HashMap;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, Problem};
use super::{ApiResult, AppState};
use crate::clock::format_timestamp;
use crate::profile::Segment;
use crate::store::Store;

/// Members per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: i64 = 100;
/// The most members a page may ask for.
pub const MAX_LIMIT: i64 = 1000;
/// Members the CSV export reads from the store at a time.
const CSV_PAGE: i64 = 1000;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(segments))
        .routes(routes!(members))
        .routes(routes!(members_csv))
}

/// One segment's size and rule.
#[derive(Serialize, ToSchema)]
struct SegmentSize {
    /// `lost`, `at_risk`, `new`, `champion`, `loyal` or `occasional`.
    name: &'static str,
    /// Shoppers in it.
    size: i64,
    /// Its share of all shoppers with events (0 when there are none),
    /// four decimals.
    share: f64,
    /// Its rule; the rules are tried in the order listed, the first that
    /// holds places the shopper.
    rule: &'static str,
}

#[derive(Serialize, ToSchema)]
struct Segments {
    /// The newest event in the store when the segments were computed: "now"
    /// for every churn risk; `null` before the first computation or
    /// without events.
    as_of: Option<String>,
    /// When they were computed; `null` before the first computation since
    /// the process started (the sizes are then those last stored).
    computed_at: Option<String>,
    /// All six segments, in rule order, even when empty.
    segments: Vec<SegmentSize>,
    /// The shoppers by churn risk, in ten buckets of 0.1 from 0 to 1 (the
    /// last includes 1), as of the same computation.
    churn_risk_histogram: Vec<RiskBucket>,
}

/// Shoppers whose churn risk is in [`from`, `to`).
#[derive(Serialize, ToSchema)]
struct RiskBucket {
    from: f64,
    to: f64,
    users: i64,
}

/// Every segment's size.
///
/// Every shopper with events is in exactly one segment; the sizes add up to
/// them, as of the last computation (every `segments_refresh`). The rules
/// are in docs/api.md ("Profiles").
#[utoipa::path(
    get,
    path = "/v1/segments",
    tag = "users",
    responses((status = 200, description = "The segments", body = Segments))
)]
async fn segments(State(state): State<AppState>) -> ApiResult<Json<Segments>> {
    let sizes: HashMap<String, i64> = state.store.segment_sizes().await?.into_iter().collect();
    let total: i64 = sizes.values().sum();
    let computed = state.app.segments();
    let segments = Segment::ALL
        .into_iter()
        .map(|segment| {
            let size = sizes.get(segment.name()).copied().unwrap_or(0);
            let share = if total > 0 {
                (size as f64 / total as f64 * 10_000.0).round() / 10_000.0
            } else {
                0.0
            };
            SegmentSize {
                name: segment.name(),
                size,
                share,
                rule: segment.rule(),
            }
        })
        .collect();
    let churn_risk_histogram = (0..10)
        .zip(state.store.churn_histogram().await?)
        .map(|(k, users)| RiskBucket {
            from: f64::from(k) / 10.0,
            to: f64::from(k + 1) / 10.0,
            users,
        })
        .collect();
    Ok(Json(Segments {
        as_of: computed.and_then(|c| c.as_of_ms).map(format_timestamp),
        computed_at: computed.map(|c| format_timestamp(c.computed_at_ms)),
        segments,
        churn_risk_histogram,
    }))
}

/// The parameters of the member list.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct MembersQuery {
    /// Members per page.
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page; absent for the first.
    cursor: Option<String>,
}

/// A member of a segment.
#[derive(Serialize, ToSchema)]
struct Member {
    user_id: String,
    /// As the profile's `churn.risk`, at the last computation.
    churn_risk: f64,
    /// The shopper's newest event.
    last_seen: String,
}

#[derive(Serialize, ToSchema)]
struct Members {
    users: Vec<Member>,
    /// Pass as `cursor` for the next page; `null` on the last.
    next_cursor: Option<String>,
}

type Params = HashMap<String, String>;

fn segment_of(name: &str) -> Result<Segment, ApiError> {
    Segment::from_name(name).ok_or_else(|| ApiError::NotFound(format!("no segment {name:?}")))
}

/// The stored id a cursor continues after.
fn parse_cursor(params: &Params) -> Result<String, ApiError> {
    let Some(cursor) = params.get("cursor") else {
        return Ok(String::new());
    };
    let bad = || ApiError::field("cursor", "not a cursor this API gave");
    let bytes = hex::decode(cursor).map_err(|_| bad())?;
    let key = String::from_utf8(bytes).map_err(|_| bad())?;
    if key.is_empty() {
        return Err(bad());
    }
    Ok(key)
}

/// A segment's members, a page at a time.
///
/// In a stable order (by the id as stored); each page's `next_cursor`
/// continues after its last member. As of the last computation; an erased
/// shopper leaves the lists at once.
#[utoipa::path(
    get,
    path = "/v1/segments/{name}/users",
    tag = "users",
    params(("name" = String, Path, description = "The segment, e.g. `at_risk`"), MembersQuery),
    responses(
        (status = 200, description = "A page of members", body = Members),
        (status = 404, description = "`not-found`: no segment of that name",
            body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid-fields`: a bad `limit` or `cursor`",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn members(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(params): Query<Params>,
) -> ApiResult<Json<Members>> {
    let segment = segment_of(&name)?;
    let limit = super::error::single_limit(&params, "limit", DEFAULT_LIMIT, MAX_LIMIT)?;
    let after = parse_cursor(&params)?;
    // One more than asked says whether a next page exists.
    let mut page = state.store.segment_members(segment.name(), &after, limit + 1).await?;
    let more = page.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    page.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next_cursor = if more {
        page.last().map(|m| hex::encode(&m.key))
    } else {
        None
    };
    Ok(Json(Members {
        users: page
            .into_iter()
            .map(|m| Member {
                user_id: m.user_id,
                churn_risk: m.churn_risk,
                last_seen: format_timestamp(m.last_seen_ms),
            })
            .collect(),
        next_cursor,
    }))
}

/// A segment's members as CSV.
///
/// Every member, in the list's order, with a header row
/// `user_id,churn_risk,last_seen`; streamed from the store a page at a
/// time.
#[utoipa::path(
    get,
    path = "/v1/segments/{name}/users.csv",
    tag = "users",
    params(("name" = String, Path, description = "The segment, e.g. `at_risk`")),
    responses(
        (status = 200, description = "The members", body = String, content_type = "text/csv"),
        (status = 404, description = "`not-found`: no segment of that name",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn members_csv(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<Response> {
    let segment = segment_of(&name)?;
    let header_row = Bytes::from_static(b"user_id,churn_risk,last_seen\n");
    let store = state.store.clone();
    // State: the stored id to continue after, or `None` once done.
    let pages = futures::stream::unfold(Some(String::new()), move |after| {
        let store = store.clone();
        async move {
            let after = after?;
            match csv_page(&store, segment, &after).await {
                Ok((bytes, next)) => Some((Ok::<Bytes, std::io::Error>(bytes), next)),
                Err(e) => Some((Err(std::io::Error::other(e)), None)),
            }
        }
    });
    let body = futures::StreamExt::chain(
        futures::stream::once(async move { Ok::<Bytes, std::io::Error>(header_row) }),
        futures::StreamExt::filter(pages, |chunk| {
            std::future::ready(chunk.as_ref().map_or(true, |b| !b.is_empty()))
        }),
    );
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}.csv\"", segment.name()),
            ),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

/// One page of members as CSV rows, and where the next starts (`None`
/// after the last).
async fn csv_page(store: &Store, segment: Segment, after: &str) -> anyhow::Result<(Bytes, Option<String>)> {
    let page = store.segment_members(segment.name(), after, CSV_PAGE).await?;
    let next = (page.len() == usize::try_from(CSV_PAGE).unwrap_or(usize::MAX))
        .then(|| page.last().map(|m| m.key.clone()))
        .flatten();
    let mut writer = csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new());
    for m in &page {
        writer.write_record([
            m.user_id.as_str(),
            &m.churn_risk.to_string(),
            &format_timestamp(m.last_seen_ms),
        ])?;
    }
    let bytes = writer.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((Bytes::from(bytes), next))
}
