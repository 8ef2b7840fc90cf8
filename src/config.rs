//! Typed settings, read in layers: `config/default.toml` (compiled in, so the
//! binary runs from any folder), an optional `--config FILE`, then `RECD_*`
//! environment variables. Secrets (API keys, the database password, `id_key`) are typed
//! so that printing the settings never shows them.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer};

const DEFAULTS: &str = include_str!("../config/default.toml");

/// What every subcommand is configured by.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub listen: SocketAddr,
    pub database_url: DatabaseUrl,
    pub database_max_connections: u32,
    #[serde(deserialize_with = "duration")]
    pub database_acquire_timeout: Duration,
    #[serde(deserialize_with = "api_keys")]
    pub api_keys: Vec<ApiKey>,
    /// Store shoppers' user ids and session ids encrypted with this key
    /// (256 bits as 64 hex digits; a secret that never prints); `None`
    /// when empty: stored as sent.
    #[serde(deserialize_with = "crate::store::optional_id_key")]
    pub id_key: Option<crate::store::IdKey>,
    pub log_format: LogFormat,
    /// With `serve --demo`: events per minute the simulated storefront
    /// sends through the API (0: none).
    pub demo_traffic: u32,
    /// `None` when `0`: no automatic training at all.
    #[serde(deserialize_with = "optional_duration")]
    pub train_interval: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub request_timeout: Duration,
    pub max_concurrent_requests: usize,
    /// A request that finds `max_concurrent_requests` busy waits this long
    /// for a turn before it is answered 503 with Retry-After.
    #[serde(deserialize_with = "duration")]
    pub queue_timeout: Duration,
    /// At most this many requests wait for a turn; more are answered 503
    /// at once.
    pub max_queued_requests: usize,
    /// A connection that has not sent a whole request head this long after
    /// it opened (or after its previous response) is closed.
    #[serde(deserialize_with = "duration")]
    pub header_read_timeout: Duration,
    /// A request body that has not arrived whole this long after its head
    /// is answered 408.
    #[serde(deserialize_with = "duration")]
    pub body_read_timeout: Duration,
    /// Origins whose pages may call the read endpoints from a browser
    /// (CORS); empty: none (no CORS headers at all).
    #[serde(deserialize_with = "list")]
    pub cors_origins: Vec<String>,
    /// Peers whose X-Forwarded-For is believed (addresses or networks); the
    /// rate limit keys requests without an API key by the client address.
    #[serde(deserialize_with = "networks")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Token buckets per API key and scope (`[rate_limit]`); off unless set.
    #[serde(default)]
    pub rate_limit: RateLimits,
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// A scheduled training waits for this many events newer than the
    /// served model's data.
    pub train_min_new_events: u64,
    /// While no model is served, a training stops after this many seconds
    /// (at most `train.max_train_seconds`), so that a new service answers
    /// personally soon.
    pub first_training_seconds: f64,
    /// NDCG@10 a candidate must add over the served model (or, lacking
    /// enough newer events, over the baselines) to be published.
    pub gate_margin: f64,
    /// Held-out users with events newer than the served model needed to
    /// compare candidate and served model directly.
    pub gate_min_cases: usize,
    /// How often every replica looks for a newer snapshot and catalogue
    /// changes (and the leader whether to train).
    #[serde(deserialize_with = "duration")]
    pub snapshot_poll: Duration,
    /// The window of the cold-start popular list; `None` when `0` (all).
    #[serde(deserialize_with = "optional_duration")]
    pub popular_window: Option<Duration>,
    /// Popular lists are recomputed in the background this often when new
    /// events arrived.
    #[serde(deserialize_with = "duration")]
    pub popular_refresh: Duration,
    /// The shop statistics (RFM cuts, usual gap) and the warming list count
    /// the events of this window back from the newest; `None` when `0`.
    #[serde(deserialize_with = "optional_duration")]
    pub stats_window: Option<Duration>,
    /// The shop statistics are recomputed in the background this often when
    /// new events arrived.
    #[serde(deserialize_with = "duration")]
    pub stats_refresh: Duration,
    /// Every category's rating figures are recomputed in the background
    /// this often when new events arrived (or the catalogue's categories
    /// changed, or a user was erased).
    #[serde(deserialize_with = "duration")]
    pub rating_stats_refresh: Duration,
    /// Every shopper's segment (GET /v1/segments) is recomputed in the
    /// background this often when events arrived or were retired.
    #[serde(deserialize_with = "duration")]
    pub segments_refresh: Duration,
    /// Every replica writes its heartbeat (`GET /v1/replicas`) this often;
    /// it is healthy while its last is at most three of these old.
    #[serde(deserialize_with = "duration")]
    pub heartbeat_interval: Duration,
    /// The overview's active shoppers and store counts are counted in the
    /// background this often.
    #[serde(deserialize_with = "duration")]
    pub overview_refresh: Duration,
    /// Events, answers and clicks per minute are kept this long.
    #[serde(deserialize_with = "duration")]
    pub minute_stats_retention: Duration,
    /// Events per item and day are kept this long.
    #[serde(deserialize_with = "duration")]
    pub item_activity_retention: Duration,
    /// Ingest's pending per-minute counts and clicks (PostgreSQL) are
    /// folded in this often.
    #[serde(deserialize_with = "duration")]
    pub minute_stats_fold: Duration,
    /// Ingest's pending per-item counts are folded into the per-day ones
    /// this often.
    #[serde(deserialize_with = "duration")]
    pub item_activity_fold: Duration,
    /// A scheduled training continues from the served model's weights
    /// unless the training from scratch it descends from is this old (then
    /// it starts from scratch).
    #[serde(deserialize_with = "duration")]
    pub scratch_interval: Duration,
    /// Events older than this before the newest event are retired in the
    /// background (whole partitions on Postgres); `None` when `0`: kept.
    #[serde(deserialize_with = "optional_duration")]
    pub events_retention: Option<Duration>,
    /// Impressions (one row per recommendations response) are kept this
    /// long; click-through figures cover this window.
    #[serde(deserialize_with = "duration")]
    pub impressions_retention: Duration,
    /// After each new model, the states of up to this many of the most
    /// recently active users are made ahead of their next request; `0`: none.
    pub warm_users: usize,
    /// The category filters (`category=` on recommendations, similar and
    /// popular) also accept an item without categories whose top suggested
    /// category is the one asked for.
    pub suggested_categories_in_filters: bool,
    /// ... when that suggestion's confidence is at least this (0..1).
    pub suggested_category_min_confidence: f64,
    /// The model's training settings (`[train]`; `RECD_TRAIN__DIM=32` and so on).
    #[serde(default)]
    pub train: crate::model::TrainConfig,
    /// Approximate nearest neighbours for large catalogues (`[ann]`;
    /// `RECD_ANN__MIN_ITEMS=0` turns them off).
    #[serde(default)]
    pub ann: crate::model::ann::AnnSettings,
}

impl Settings {
    /// Defaults, then `file`, then the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Toml::string(DEFAULTS));
        if let Some(file) = file {
            if !file.exists() {
                anyhow::bail!("config file {} does not exist", file.display());
            }
            figment = figment.merge(Toml::file(file));
        }
        // Values from the environment are taken as strings; the deserializers
        // below parse numbers, durations and addresses themselves.
        let settings = figment
            .merge(Env::prefixed("RECD_").ignore(&["config"]).split("__"))
            .extract()?;
        Ok(settings)
    }

    /// The settings as the tests and the demo want them: defaults with a
    /// given store, nothing read from the environment.
    pub fn with_database(url: &str) -> anyhow::Result<Self> {
        let settings = Figment::from(Toml::string(DEFAULTS))
            .merge(("database_url", url))
            .extract()?;
        Ok(settings)
    }
}

/// Requests per second and burst for each scope's routes, per API key (or
/// per client address when no keys are configured); a rate of `0` leaves
/// that scope unlimited.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
pub struct RateLimits {
    pub read: f64,
    pub read_burst: u32,
    pub write: f64,
    pub write_burst: u32,
    pub admin: f64,
    pub admin_burst: u32,
}

impl RateLimits {
    /// The rate (per second) and burst of a scope's routes, if limited.
    pub fn of(&self, scope: Scope) -> Option<(f64, u32)> {
        let (rate, burst) = match scope {
            Scope::Read => (self.read, self.read_burst),
            Scope::Write => (self.write, self.write_burst),
            Scope::Admin => (self.admin, self.admin_burst),
        };
        // A burst below one request would refuse everything.
        (rate > 0.0).then(|| (rate, burst.max(1)))
    }
}

/// The store's URL; its password is masked when printed.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(pub String);

impl DatabaseUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// `postgres://user:secret@host/db` -> `postgres://user:***@host/db`.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }

    /// `admin` implies `write` and `read`; `write` does not imply `read`.
    pub fn allows(self, needed: Scope) -> bool {
        self == needed || self == Scope::Admin
    }
}

/// One configured key. The key itself never prints.
#[derive(Clone)]
pub struct ApiKey {
    pub scope: Scope,
    pub key: String,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}:***", self.scope)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Parses `scope:key,scope:key`.
pub fn parse_api_keys(spec: &str) -> Result<Vec<ApiKey>, String> {
    spec.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            let (scope, key) = part
                .split_once(':')
                .ok_or_else(|| "an API key must be written scope:key".to_owned())?;
            let scope = match scope.trim() {
                "read" => Scope::Read,
                "write" => Scope::Write,
                "admin" => Scope::Admin,
                other => return Err(format!("unknown API key scope {other:?} (read, write, admin)")),
            };
            if key.is_empty() {
                return Err("an API key may not be empty".to_owned());
            }
            Ok(ApiKey {
                scope,
                key: key.to_owned(),
            })
        })
        .collect()
}

/// Parses `10s`, `5m`, `1h`, `250ms`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

/// A comma-separated list (a string, from TOML or the environment).
fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let text = String::deserialize(d)?;
    Ok(text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Addresses (`10.0.0.7`) or networks (`10.0.0.0/8`), comma-separated.
fn networks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    list(d)?
        .into_iter()
        .map(|text| {
            text.parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| serde::de::Error::custom(format!("{text:?} is not an IP address or network")))
        })
        .collect()
}

fn api_keys<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ApiKey>, D::Error> {
    let spec = String::deserialize(d)?;
    parse_api_keys(&spec).map_err(serde::de::Error::custom)
}

/// Durations may come as strings or (from TOML or the environment) numbers of seconds.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Secs(u64),
    Text(String),
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match RawDuration::deserialize(d)? {
        RawDuration::Secs(s) => Ok(Duration::from_secs(s)),
        RawDuration::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
    }
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let value = duration(d)?;
    Ok((!value.is_zero()).then_some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_never_print() {
        let keys = parse_api_keys("read:abc, admin:s3cret").unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[1].scope, Scope::Admin);
        let printed = format!("{keys:?}");
        assert!(!printed.contains("s3cret") && !printed.contains("abc"), "{printed}");
        assert!(parse_api_keys("root:x").is_err());
        assert!(parse_api_keys("read").is_err());
    }

    #[test]
    fn database_password_is_masked() {
        let url = DatabaseUrl("postgres://recd:hunter2@db:5432/recd".into());
        assert_eq!(format!("{url:?}"), "postgres://recd:***@db:5432/recd");
    }

    #[test]
    fn id_key_is_optional_and_never_prints() {
        let key = "a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1";
        let settings = Settings::with_database("sqlite://x.db").unwrap();
        assert!(settings.id_key.is_none());
        let settings: Settings = Figment::from(Toml::string(DEFAULTS))
            .merge(("id_key", key))
            .extract()
            .unwrap();
        assert!(settings.id_key.is_some());
        let printed = format!("{settings:?}");
        assert!(!printed.contains(key) && !printed.contains(&key[..16]), "{printed}");
        let bad = Figment::from(Toml::string(DEFAULTS))
            .merge(("id_key", "abc"))
            .extract::<Settings>();
        assert!(bad.unwrap_err().to_string().contains("64 hex digits"));
        // All decimal digits, parsed as the environment's values are: a key.
        let digits = "1234567890".repeat(6) + "1234";
        let env = Figment::from(Toml::string(DEFAULTS))
            .merge(("id_key", digits.parse::<figment::value::Value>().unwrap()))
            .extract::<Settings>();
        assert!(env.unwrap().id_key.is_some());
        // A value read as a number is refused without being shown.
        let number = Figment::from(Toml::string(DEFAULTS))
            .merge(("id_key", 123456.5))
            .extract::<Settings>();
        let error = number.unwrap_err().to_string();
        assert!(error.contains("64 hex digits") && !error.contains("123456"), "{error}");
    }

    #[test]
    fn scopes() {
        assert!(Scope::Admin.allows(Scope::Read));
        assert!(Scope::Admin.allows(Scope::Write));
        assert!(!Scope::Write.allows(Scope::Read));
        assert!(!Scope::Read.allows(Scope::Write));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("soon").is_err());
    }
}
