//! The admin API's OpenAPI document, generated from the handlers' annotations and the response
//! types ([`super::api`]); served without authentication at `/api/v1/openapi.json` (it describes
//! the API, it holds no data).

use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "DMR operators' console API",
        description = "Agents and their queues, dead letters (list, replay, purge) and validation failures, on the server's ADMIN_PORT. Every operation needs a bearer token from ADMIN_TOKEN_FILE."
    ),
    paths(
        super::api::agents,
        super::api::dead_letters,
        super::api::replay,
        super::api::purge_dead_letters,
        super::api::validation_failures,
        super::api::validation_failure,
        super::api::purge_validation_failures
    ),
    modifiers(&BearerAuth)
)]
pub struct AdminApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// `/api/v1/openapi.json`.
pub fn routes() -> Router {
    Router::new().route("/api/v1/openapi.json", get(|| async { Json(AdminApiDoc::openapi()) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_with_bearer_security() {
        let doc = serde_json::to_value(AdminApiDoc::openapi()).unwrap_or_default();
        for path in [
            "/api/v1/agents",
            "/api/v1/agents/{id}/dead-letters",
            "/api/v1/agents/{id}/dead-letters/replay",
            "/api/v1/agents/{id}/dead-letters/purge",
            "/api/v1/validation-failures",
            "/api/v1/validation-failures/{id}",
            "/api/v1/validation-failures/purge",
        ] {
            let item = &doc["paths"][path];
            assert!(item.is_object(), "{path} is documented");
            let op = item
                .as_object()
                .and_then(|o| o.values().next())
                .cloned()
                .unwrap_or_default();
            assert_eq!(
                op["security"][0]["bearer"],
                serde_json::json!([]),
                "{path} needs the bearer token"
            );
        }
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
        assert!(doc["components"]["schemas"]["DeadLetterView"].is_object());
    }
}
