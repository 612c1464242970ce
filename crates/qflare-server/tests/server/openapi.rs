//! `/openapi.json`: served without credentials, generated from the handlers,
//! and covering exactly the API routes the router serves.

use std::collections::BTreeSet;

use qflare_protocol::api::{ErrorCode, routes};
use serde_json::Value;

use crate::harness::{Setup, TestServer, tempdir};

/// Every API route as (method, path): what the document must list.
fn api_routes() -> BTreeSet<(&'static str, &'static str)> {
    [
        ("get", routes::HEALTHZ),
        ("get", routes::SERVER_INFO),
        ("post", routes::ENROLL),
        ("post", routes::SESSIONS),
        ("post", routes::SESSION_CONFIRM),
        ("post", routes::SESSION_PING),
        ("post", routes::ROTATE_KEYS),
        ("post", routes::CURRENT_ROUND),
        ("post", routes::CURRENT_MODEL),
        ("post", routes::UPDATE_ADMISSION),
        ("post", routes::UPDATES),
        ("post", routes::EVALUATIONS),
        ("post", routes::ADMIN_TOKENS),
        ("get", routes::ADMIN_TOKENS),
        ("post", routes::ADMIN_TOKEN_REVOKE),
        ("get", routes::ADMIN_DEVICES),
        ("post", routes::ADMIN_DEVICE_REVOKE),
        ("get", routes::ADMIN_AUDIT),
        ("get", routes::ADMIN_ROUNDS),
        ("post", routes::ADMIN_ROUNDS_START),
        ("post", routes::ADMIN_ROUNDS_PAUSE),
        ("post", routes::ADMIN_MODELS),
        ("get", routes::ADMIN_MODEL),
        ("get", routes::ADMIN_MODEL_CERTIFICATE),
    ]
    .into_iter()
    .collect()
}

#[tokio::test]
async fn the_openapi_document_describes_every_api_route() {
    let dir = tempdir();
    let server = TestServer::start(Setup::new(dir.path())).await;
    let response = server
        .admin
        .http
        .get(server.admin.url(routes::OPENAPI))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "served without credentials");
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let document: Value = response.json().await.unwrap();
    assert!(document["openapi"].as_str().unwrap().starts_with("3.1"));
    assert_eq!(document["info"]["title"], "QFLARE server API");

    let paths = document["paths"].as_object().unwrap();
    let mut listed = BTreeSet::new();
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            if !["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                continue;
            }
            let route = api_routes()
                .into_iter()
                .find(|(m, p)| m == method && p == path)
                .unwrap_or_else(|| panic!("{method} {path} is documented but not an API route"));
            listed.insert(route);

            let responses = operation["responses"].as_object().unwrap();
            assert!(
                responses.keys().any(|status| status.starts_with('2')),
                "{method} {path} documents its success"
            );
            assert_eq!(
                responses["default"]["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/ErrorBody",
                "{method} {path} documents the error body"
            );
            let admin = path.starts_with("/v1/admin/");
            let security = &operation["security"];
            if admin {
                assert_eq!(
                    security[0]["admin_token"],
                    serde_json::json!([]),
                    "{method} {path} needs the admin token"
                );
                assert_eq!(operation["tags"][0], "admin");
            } else {
                assert!(security.is_null(), "{method} {path} is not an admin route");
            }
            if path.contains("{id}") {
                let params = operation["parameters"].as_array().unwrap();
                assert!(
                    params
                        .iter()
                        .any(|p| p["name"] == "id" && p["in"] == "path"),
                    "{method} {path} documents its path parameter"
                );
            }
        }
    }
    assert_eq!(listed, api_routes(), "every API route is documented");
    assert!(
        !paths.contains_key(routes::PAGE_DASHBOARD),
        "HTML pages are not part of the API"
    );

    // The schemas a client needs, with the wire forms the serde impls use.
    let schemas = &document["components"]["schemas"];
    let codes: BTreeSet<&str> = schemas["ErrorCode"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let expected: BTreeSet<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(codes, expected, "every error code is listed");
    let enroll = &schemas["EnrollRequest"]["properties"];
    assert_eq!(enroll["kem_public_key"]["type"], "string");
    // Unpadded base64url, as `wire::b64` writes it (not OpenAPI's `byte`,
    // which is padded standard base64).
    assert_eq!(enroll["kem_public_key"]["contentEncoding"], "base64url");
    assert_eq!(enroll["kem_public_key"]["pattern"], "^[A-Za-z0-9_-]*$");
    assert!(
        schemas["KemSuite"]["enum"]
            .as_array()
            .unwrap()
            .contains(&Value::from("ml-kem-768"))
    );
    assert_eq!(schemas["SealedRecord"]["format"], "binary");
    assert_eq!(
        document["paths"][routes::UPDATES]["post"]["requestBody"]["content"]["application/vnd.qflare.sealed"]
            ["schema"]["$ref"],
        "#/components/schemas/SealedRecord"
    );
    assert_eq!(
        document["components"]["securitySchemes"]["admin_token"]["scheme"],
        "bearer"
    );
    server.stop().await;
}
