//! What an event is, and the one validation both `POST /v1/events` and
//! `recd import` run, so that the API and the importer accept the same rows.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::domain::{EventType, NewEvent};

/// Events may be at most this far in the future (clock skew of collectors).
pub const MAX_FUTURE_MS: i64 = 5 * 60 * 1000;
/// Ids are 1 to 128 printable characters.
pub const MAX_ID_CHARS: usize = 128;

/// One reason an event (or item) was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        FieldError {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// Checks an id chosen by the shop: 1 to 128 printable characters.
pub fn check_id(field: &str, id: &str) -> Result<(), FieldError> {
    let chars = id.chars().count();
    if chars == 0 {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if chars > MAX_ID_CHARS {
        return Err(FieldError::new(
            field,
            format!("must be at most {MAX_ID_CHARS} characters, got {chars}"),
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(FieldError::new(field, "must be printable characters only"));
    }
    Ok(())
}

/// Validates one event of a `POST /v1/events` body. `now_ms` is the
/// server's clock: the default timestamp and the bound on future ones.
pub fn validate_event(raw: &Value, now_ms: i64) -> Result<NewEvent, Vec<FieldError>> {
    let Some(obj) = raw.as_object() else {
        return Err(vec![FieldError::new("event", "must be a JSON object")]);
    };
    let mut errors = Vec::new();
    let event_id = optional_id(obj, "event_id", &mut errors);
    let user_id = required_id(obj, "user_id", &mut errors);
    let item_id = required_id(obj, "item_id", &mut errors);
    let session_id = optional_id(obj, "session_id", &mut errors);
    let recommendation_id = optional_id(obj, "recommendation_id", &mut errors);

    let kind = match obj.get("type") {
        None | Some(Value::Null) => {
            errors.push(FieldError::new("type", "is required"));
            None
        }
        Some(Value::String(name)) => {
            let kind = EventType::parse(name);
            if kind.is_none() {
                errors.push(FieldError::new(
                    "type",
                    format!(
                        "unknown event type {name:?}; one of view, click, like, add_to_cart, remove_from_cart, purchase, rating"
                    ),
                ));
            }
            kind
        }
        Some(_) => {
            errors.push(FieldError::new("type", "must be a string"));
            None
        }
    };

    let value = match obj.get("value") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_f64().filter(|v| v.is_finite()),
        Some(_) => {
            errors.push(FieldError::new("value", "must be a number"));
            None
        }
    };
    let ts = match obj.get("timestamp") {
        None | Some(Value::Null) => Some(now_ms),
        Some(Value::String(text)) => match parse_timestamp(text) {
            Ok(ts) => Some(ts),
            Err(e) => {
                errors.push(e);
                None
            }
        },
        Some(_) => {
            errors.push(FieldError::new("timestamp", "must be an RFC 3339 string"));
            None
        }
    };
    if let Some(ts) = ts {
        if ts > now_ms + MAX_FUTURE_MS {
            errors.push(FieldError::new(
                "timestamp",
                "must not be more than 5 minutes in the future",
            ));
        }
    }
    if let Some(kind) = kind {
        // `"value": null` is an absent value, as null is for every optional field.
        let present = !matches!(obj.get("value"), None | Some(Value::Null));
        if let Err(e) = check_value(kind, value, present) {
            errors.push(e);
        }
    }

    match (errors.is_empty(), user_id, item_id, kind, ts) {
        (true, Some(user_id), Some(item_id), Some(kind), Some(ts)) => Ok(NewEvent {
            event_id,
            user_id,
            item_id,
            kind,
            value,
            ts,
            timestamped: !matches!(obj.get("timestamp"), None | Some(Value::Null)),
            session_id,
            recommendation_id,
        }),
        _ => Err(errors),
    }
}

/// Ratings need a value from 1 to 5; a purchase's amount may not be negative.
pub fn check_value(kind: EventType, value: Option<f64>, present: bool) -> Result<(), FieldError> {
    match (kind, value) {
        (EventType::Rating, None) if present => Err(FieldError::new("value", "must be a finite number")),
        (EventType::Rating, None) => Err(FieldError::new("value", "is required for a rating (1 to 5)")),
        (EventType::Rating, Some(v)) if !(1.0..=5.0).contains(&v) => Err(FieldError::new(
            "value",
            format!("a rating must be from 1 to 5, got {v}"),
        )),
        (EventType::Purchase, Some(v)) if v < 0.0 => {
            Err(FieldError::new("value", "a purchase amount may not be negative"))
        }
        (_, None) if present => Err(FieldError::new("value", "must be a finite number")),
        _ => Ok(()),
    }
}

/// Most events in one `POST /v1/events` batch.
pub const MAX_BATCH: usize = 1000;

/// Why a whole batch is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BatchError {
    /// 400: nothing stored.
    #[error("{0}")]
    Malformed(String),
    /// 422: an empty batch or one too large.
    #[error("must hold 1 to {MAX_BATCH} events, got {0}")]
    Count(usize),
}

/// A batch read: its valid events, and each invalid one's index and errors.
#[derive(Debug, Default)]
pub struct Batch {
    pub valid: Vec<NewEvent>,
    pub rejected: Vec<(usize, Vec<FieldError>)>,
}

/// Reads a `POST /v1/events` body: `{"events": [...]}` with 1 to
/// `MAX_BATCH` events, each validated on its own.
pub fn parse_batch(body: &[u8], now_ms: i64) -> Result<Batch, BatchError> {
    #[derive(Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        events: Vec<&'a RawValue>,
    }
    let raw = match serde_json::from_slice::<Body<'_>>(body) {
        Ok(body) => body.events,
        Err(_) => {
            // Not the usual shape: say whether it is JSON at all.
            serde_json::from_slice::<serde::de::IgnoredAny>(body)
                .map_err(|e| BatchError::Malformed(format!("the body is not valid JSON: {e}")))?;
            return Err(BatchError::Malformed(
                "the body must be an object with an \"events\" array".to_owned(),
            ));
        }
    };
    if raw.is_empty() || raw.len() > MAX_BATCH {
        return Err(BatchError::Count(raw.len()));
    }
    let mut batch = Batch {
        valid: Vec::with_capacity(raw.len()),
        rejected: Vec::new(),
    };
    for (index, event) in raw.iter().enumerate() {
        match validate_event_json(event.get(), now_ms) {
            Ok(event) => batch.valid.push(event),
            Err(errors) => batch.rejected.push((index, errors)),
        }
    }
    Ok(batch)
}

/// The usual shape of an event, read without building a JSON tree.
#[derive(Deserialize)]
struct Typed<'a> {
    #[serde(borrow, default)]
    event_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    item_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(default)]
    value: Option<f64>,
    #[serde(borrow, default)]
    timestamp: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    session_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    recommendation_id: Option<Cow<'a, str>>,
}

impl Typed<'_> {
    /// The event if every check passes; `None` sends it to
    /// `validate_event`, which names what is wrong.
    fn into_event(self, now_ms: i64) -> Option<NewEvent> {
        let id = |field: &str, v: Option<Cow<'_, str>>| -> Result<Option<String>, ()> {
            match v {
                None => Ok(None),
                Some(v) => check_id(field, &v).map(|()| Some(v.into_owned())).map_err(drop),
            }
        };
        let kind = EventType::parse(self.kind.as_deref()?)?;
        let ts = match self.timestamp.as_deref() {
            None => now_ms,
            Some(text) => parse_timestamp(text).ok()?,
        };
        if ts > now_ms + MAX_FUTURE_MS || check_value(kind, self.value, self.value.is_some()).is_err() {
            return None;
        }
        Some(NewEvent {
            event_id: id("event_id", self.event_id).ok()?,
            user_id: id("user_id", self.user_id).ok()??,
            item_id: id("item_id", self.item_id).ok()??,
            kind,
            value: self.value,
            ts,
            timestamped: self.timestamp.is_some(),
            session_id: id("session_id", self.session_id).ok()?,
            recommendation_id: id("recommendation_id", self.recommendation_id).ok()?,
        })
    }
}

/// Validates one event given as JSON text: the common shape is read
/// straight into its fields; anything else goes through `validate_event`,
/// so both accept and refuse exactly the same events.
pub fn validate_event_json(raw: &str, now_ms: i64) -> Result<NewEvent, Vec<FieldError>> {
    if let Some(event) = serde_json::from_str::<Typed<'_>>(raw)
        .ok()
        .and_then(|t| t.into_event(now_ms))
    {
        return Ok(event);
    }
    match serde_json::from_str::<Value>(raw) {
        Ok(value) => validate_event(&value, now_ms),
        Err(e) => Err(vec![FieldError::new("event", format!("not valid JSON: {e}"))]),
    }
}

/// RFC 3339 to milliseconds since the epoch.
pub fn parse_timestamp(text: &str) -> Result<i64, FieldError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc).timestamp_millis())
        .map_err(|e| FieldError::new("timestamp", format!("not an RFC 3339 timestamp: {e}")))
}

/// An item's categories as the items CSV gives them: `categories` split by
/// `|`, or else the single `category`.
pub fn split_categories(categories: Option<&str>, category: Option<&str>) -> Vec<String> {
    let mut out: Vec<String> = categories
        .map(|c| c.split('|').filter(|c| !c.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default();
    if out.is_empty() {
        out.extend(category.filter(|c| !c.is_empty()).map(str::to_owned));
    }
    out
}

/// The id `recd import` gives a row that has none: a hash of its fields, so
/// that importing the same file twice stores nothing twice.
pub fn derived_event_id(event: &NewEvent) -> String {
    let mut hasher = Sha256::new();
    for part in [
        event.user_id.as_str(),
        event.item_id.as_str(),
        event.kind.name(),
        &event.value.map(|v| v.to_string()).unwrap_or_default(),
        &event.ts.to_string(),
    ] {
        hasher.update(part.as_bytes());
        hasher.update([0u8]);
    }
    let digest = hasher.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("import-{hex}")
}

fn required_id(obj: &Map<String, Value>, field: &str, errors: &mut Vec<FieldError>) -> Option<String> {
    match obj.get(field) {
        None | Some(Value::Null) => {
            errors.push(FieldError::new(field, "is required"));
            None
        }
        Some(value) => string_id(field, value, errors),
    }
}

fn optional_id(obj: &Map<String, Value>, field: &str, errors: &mut Vec<FieldError>) -> Option<String> {
    match obj.get(field) {
        None | Some(Value::Null) => None,
        Some(value) => string_id(field, value, errors),
    }
}

fn string_id(field: &str, value: &Value, errors: &mut Vec<FieldError>) -> Option<String> {
    let Value::String(id) = value else {
        errors.push(FieldError::new(field, "must be a string"));
        return None;
    };
    match check_id(field, id) {
        Ok(()) => Some(id.clone()),
        Err(e) => {
            errors.push(e);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_700_000_000_000;

    #[test]
    fn a_full_event_validates() {
        let e = validate_event(
            &json!({"event_id": "e1", "user_id": "u", "item_id": "i", "type": "purchase",
                    "value": 9.5, "timestamp": "2023-11-14T22:13:20Z", "session_id": "s"}),
            NOW,
        )
        .unwrap();
        assert_eq!(e.kind, EventType::Purchase);
        assert_eq!(e.ts, NOW);
        assert_eq!(e.value, Some(9.5));
    }

    #[test]
    fn each_bad_field_is_named() {
        let errors = validate_event(&json!({"user_id": 5, "type": "buy", "timestamp": "yesterday"}), NOW).unwrap_err();
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["user_id", "item_id", "type", "timestamp"]);
    }

    #[test]
    fn ratings_and_future() {
        let rating = |v: Value| {
            validate_event(
                &json!({"user_id": "u", "item_id": "i", "type": "rating", "value": v}),
                NOW,
            )
        };
        assert!(rating(json!(3)).is_ok());
        assert_eq!(rating(json!(6)).unwrap_err()[0].field, "value");
        assert_eq!(rating(Value::Null).unwrap_err()[0].field, "value");
        let future = validate_event(
            &json!({"user_id": "u", "item_id": "i", "type": "view", "timestamp": "2099-01-01T00:00:00Z"}),
            NOW,
        );
        assert_eq!(future.unwrap_err()[0].field, "timestamp");
    }

    #[test]
    fn ids_are_bounded_and_printable() {
        assert!(check_id("user_id", &"x".repeat(128)).is_ok());
        assert!(check_id("user_id", &"x".repeat(129)).is_err());
        assert!(check_id("user_id", "a\nb").is_err());
        assert!(check_id("user_id", "").is_err());
    }

    #[test]
    fn derived_ids_are_stable() {
        let e = validate_event(&json!({"user_id": "u", "item_id": "i", "type": "view"}), NOW).unwrap();
        assert_eq!(derived_event_id(&e), derived_event_id(&e.clone()));
        let mut other = e.clone();
        other.ts += 1;
        assert_ne!(derived_event_id(&e), derived_event_id(&other));
    }

    /// A field's value as a collector might send it, good or bad.
    fn field_value() -> impl proptest::strategy::Strategy<Value = Option<Value>> {
        use proptest::prelude::*;
        prop_oneof![
            Just(None),
            Just(Some(Value::Null)),
            Just(Some(json!("u-1"))),
            Just(Some(json!(""))),
            Just(Some(json!("x".repeat(129)))),
            Just(Some(json!("tab\there"))),
            Just(Some(json!("view"))),
            Just(Some(json!("purchase"))),
            Just(Some(json!("rating"))),
            Just(Some(json!("2023-11-14T22:13:20Z"))),
            Just(Some(json!("2099-01-01T00:00:00Z"))),
            Just(Some(json!("yesterday"))),
            Just(Some(json!(3))),
            Just(Some(json!(-2.5))),
            Just(Some(json!(7))),
            Just(Some(json!(["a"]))),
            Just(Some(json!({"a": 1}))),
            Just(Some(json!(true))),
        ]
    }

    proptest::proptest! {
        /// The fast reading of the usual shape accepts and refuses exactly
        /// what the general validation does, with the same errors.
        #[test]
        fn fast_path_agrees_with_validate_event(
            fields in proptest::collection::vec(field_value(), 8),
        ) {
            let names = ["event_id", "user_id", "item_id", "type", "value", "timestamp", "session_id", "recommendation_id"];
            let mut obj = Map::new();
            for (name, value) in names.iter().zip(fields) {
                if let Some(value) = value {
                    obj.insert((*name).to_owned(), value);
                }
            }
            let value = Value::Object(obj);
            let text = value.to_string();
            proptest::prop_assert_eq!(validate_event_json(&text, NOW), validate_event(&value, NOW));
        }
    }

    #[test]
    fn batches_are_read_whole_or_refused() {
        let ok = br#"{"events": [{"user_id": "u", "item_id": "i", "type": "view"}, {"user_id": "u"}]}"#;
        let batch = parse_batch(ok, NOW).unwrap();
        assert_eq!(batch.valid.len(), 1);
        assert_eq!(batch.rejected.len(), 1);
        assert_eq!(batch.rejected[0].0, 1);
        assert!(matches!(parse_batch(b"{nope", NOW), Err(BatchError::Malformed(m)) if m.contains("not valid JSON")));
        assert!(matches!(parse_batch(br#"{"events": 3}"#, NOW), Err(BatchError::Malformed(m)) if m.contains("events")));
        assert_eq!(
            parse_batch(br#"{"events": []}"#, NOW).unwrap_err(),
            BatchError::Count(0)
        );
    }
}
