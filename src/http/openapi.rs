//! The OpenAPI 3.1 document of the API, made from the handlers: each module
//! registers its routes with `utoipa_axum::routes!`, which takes the method,
//! path, parameters, bodies and statuses from the handler's
//! `#[utoipa::path]`, so a route cannot be served without being documented.
//! What every route shares is added here once: the API-key scheme and the
//! scope each `/v1` operation needs (from the same rule the key check
//! applies), and the problem answers that the layers may give to any
//! request.

use axum::http::Method;
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::{ResponseBuilder, Responses};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, OpenApi, Ref, RefOr};
use utoipa::{Modify, OpenApi as _, PartialSchema, ToSchema};

use super::auth::{needed_scope, KEY_ROUTE};
use super::error::{Problem, PROBLEM_JSON};

/// The name of the API-key security scheme.
const API_KEY: &str = "api_key";

/// An id the shop chooses: 1 to 128 characters (Unicode scalar values),
/// none of them a control character. Spaces and non-ASCII letters are
/// allowed; in a path it is percent-encoded.
pub(super) struct Id;

impl PartialSchema for Id {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(crate::ingest::MAX_ID_CHARS))
            // `char::is_control`: the C0 and C1 controls and DEL.
            .pattern(Some(r"^[^\u0000-\u001F\u007F-\u009F]*$"))
            .description(Some(
                "1 to 128 characters (Unicode scalar values), none of them a control character",
            ))
            .examples(["sku-1"])
            .into()
    }
}

impl ToSchema for Id {}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "recd",
        description = "The HTTP API of recd, an online recommendation service for web shops: \
            event ingest, the catalogue, real-time recommendations, profiles and the model.\n\n\
            Bodies are JSON in UTF-8; errors are RFC 9457 problems (`application/problem+json`) \
            whose `type` is one of the `urn:recd:problem:` URNs each response names. Ids are \
            strings the shop chooses. Timestamps sent are RFC 3339 with an offset; timestamps \
            recd sends are UTC with milliseconds. Every `/v1` request needs an API key (`Authorization: \
            Bearer KEY`) with the scope its operation names, unless no keys are configured; \
            the ops endpoints need none.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    tags(
        (name = "events", description = "What shoppers did"),
        (name = "catalogue", description = "The shop's items"),
        (name = "recommendations", description = "What to show"),
        (name = "users", description = "Profiles and erasure"),
        (name = "model", description = "The served model and its trainings"),
        (name = "stats", description = "The dashboard's figures: series, overview, replicas"),
        (name = "ops", description = "Health, readiness, metrics and this document; no key needed"),
    ),
    components(schemas(Problem)),
)]
struct ApiDoc;

/// The document of the routes that the handlers' descriptions made, with
/// what every operation shares added: the key scheme and scopes, and the
/// problem answers the layers give.
pub(super) fn document(routes: OpenApi) -> OpenApi {
    let mut document = ApiDoc::openapi().merge_from(routes);
    Shared.modify(&mut document);
    document
}

struct Shared;

impl Modify for Shared {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            API_KEY,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key, configured with `RECD_API_KEYS=scope:key,...`. Scopes: `read` \
                         (every GET under /v1), `write` (events and the catalogue), `admin` \
                         (everything, including erasure and training); `admin` implies the others, \
                         `write` does not imply `read`. No key, or an unknown one: 401 \
                         `unauthorized`; a key without the scope: 403 `forbidden`. With no keys \
                         configured every request is served (recd then listens on loopback only).",
                    ))
                    .build(),
            ),
        );
        for (name, description, retry_after) in COMMON {
            let mut response = ResponseBuilder::new().description(*description).content(
                PROBLEM_JSON,
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            );
            if *retry_after {
                response = response.header(
                    "Retry-After",
                    HeaderBuilder::new()
                        .schema(i64::schema())
                        .description(Some("Seconds to wait before a retry"))
                        .build(),
                );
            }
            components.responses.insert((*name).to_owned(), response.build().into());
        }

        for (path, item) in openapi.paths.paths.iter_mut() {
            let api = path.starts_with("/v1/");
            for (method, operation) in [
                (Method::GET, &mut item.get),
                (Method::PUT, &mut item.put),
                (Method::POST, &mut item.post),
                (Method::DELETE, &mut item.delete),
            ] {
                let Some(operation) = operation else { continue };
                if api {
                    let (scope, _) = needed_scope(&method, path);
                    operation.security = Some(if path == KEY_ROUTE {
                        // Any key, or none.
                        vec![
                            SecurityRequirement::default(),
                            SecurityRequirement::new(API_KEY, [""; 0]),
                        ]
                    } else {
                        vec![SecurityRequirement::new(API_KEY, [scope.name()])]
                    });
                    add(operation, "401", "Unauthorized");
                    add(operation, "403", "Forbidden");
                    if operation.request_body.is_some() {
                        add(operation, "413", "TooLarge");
                        add(operation, "415", "UnsupportedMediaType");
                    }
                }
                add(operation, "500", "Internal");
                add(operation, "503", "Unavailable");
            }
        }
    }
}

/// The answers any operation may give besides its own: name, description,
/// whether it carries Retry-After.
const COMMON: &[(&str, &str, bool)] = &[
    (
        "Unauthorized",
        "`unauthorized`: no key, or an unknown key (only when keys are configured)",
        false,
    ),
    (
        "Forbidden",
        "`forbidden`: the key's scope does not allow the operation",
        false,
    ),
    (
        "TooLarge",
        "`too-large`: the body is over 1 MiB as sent, or over 5 MiB once gzip-inflated",
        false,
    ),
    (
        "UnsupportedMediaType",
        "`unsupported-media-type`: a `Content-Encoding` recd cannot inflate (it inflates `gzip`)",
        false,
    ),
    (
        "Internal",
        "`internal`: a bug; the details are in the server log, never in the answer",
        false,
    ),
    (
        "Unavailable",
        "`overloaded` (more than `max_concurrent_requests` in flight; Retry-After 1), \
         `store-unavailable` (the database cannot be reached; Retry-After 2) or `timeout` \
         (longer than `request_timeout`; Retry-After 1)",
        true,
    ),
];

fn add(operation: &mut Operation, status: &str, response: &str) {
    let responses: &mut Responses = &mut operation.responses;
    responses
        .responses
        .entry(status.to_owned())
        .or_insert_with(|| Ref::from_response_name(response).into());
}
