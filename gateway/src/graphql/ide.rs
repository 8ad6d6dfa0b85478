//! The GraphiQL IDE, served from the binary: its page and the GraphiQL and React bundles
//! (gzipped, from the npm packages; `scripts/update-graphiql.sh`), so it works on machines
//! without internet access, where ragway is meant to run.

use actix_web::{get, web, HttpResponse};

/// `(name, content type, gzipped bytes)` of each bundled asset.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("graphiql.min.js", "text/javascript", include_bytes!("../../assets/graphiql/graphiql.min.js.gz")),
    ("graphiql.min.css", "text/css", include_bytes!("../../assets/graphiql/graphiql.min.css.gz")),
    ("react.production.min.js", "text/javascript", include_bytes!("../../assets/graphiql/react.production.min.js.gz")),
    (
        "react-dom.production.min.js",
        "text/javascript",
        include_bytes!("../../assets/graphiql/react-dom.production.min.js.gz"),
    ),
];

/// The IDE's page for the GraphQL endpoint `endpoint` (queries over HTTP, subscriptions over
/// a WebSocket on the same path).
pub fn page(endpoint: &str) -> String {
    let endpoint = serde_json::to_string(endpoint).expect("a string serializes");
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>ragway GraphiQL</title>
<style>body {{ margin: 0; height: 100vh; }} #graphiql {{ height: 100vh; }}</style>
<link rel="stylesheet" href="/graphql/assets/graphiql.min.css">
<script src="/graphql/assets/react.production.min.js"></script>
<script src="/graphql/assets/react-dom.production.min.js"></script>
<script src="/graphql/assets/graphiql.min.js"></script>
</head>
<body>
<div id="graphiql">Loading...</div>
<script>
  const path = {endpoint};
  const ws = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + path;
  const fetcher = GraphiQL.createFetcher({{ url: path, subscriptionUrl: ws }});
  ReactDOM.createRoot(document.getElementById("graphiql")).render(
    React.createElement(GraphiQL, {{ fetcher, defaultEditorToolsVisibility: true }}));
</script>
</body>
</html>
"#
    )
}

/// A bundled asset (public library code: no key needed), cached by browsers for a day.
#[get("/graphql/assets/{name}")]
pub async fn asset(name: web::Path<String>) -> HttpResponse {
    match ASSETS.iter().find(|(n, _, _)| *n == name.as_str()) {
        Some((_, content_type, bytes)) => HttpResponse::Ok()
            .content_type(*content_type)
            .insert_header(("Content-Encoding", "gzip"))
            .insert_header(("Cache-Control", "public, max-age=86400"))
            .body(*bytes),
        None => HttpResponse::NotFound().finish(),
    }
}
