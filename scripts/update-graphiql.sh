#!/usr/bin/env bash
# Refreshes the GraphiQL IDE that `GET /graphql` serves from the binary (no CDN: ragway runs
# offline). The files come from the npm packages' own builds (GraphiQL's and React's UMD
# bundles), gzipped into gateway/assets/graphiql/ and embedded with include_bytes!.
#
#   scripts/update-graphiql.sh        (needs npm; run when bumping the versions below)
set -euo pipefail
cd "$(dirname "$0")/.."
graphiql=3.8.3   # the last GraphiQL major with a UMD build
react=18.3.1
out=gateway/assets/graphiql
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "graphiql@$graphiql" "react@$react" "react-dom@$react" >/dev/null)
for p in "graphiql-$graphiql" "react-$react" "react-dom-$react"; do
  mkdir -p "$tmp/$p" && tar xzf "$tmp/$p.tgz" -C "$tmp/$p" --strip-components=1
done
mkdir -p "$out"
gz() { gzip -9 -n -c "$1" >"$out/$2.gz"; }
gz "$tmp/graphiql-$graphiql/graphiql.min.js" graphiql.min.js
gz "$tmp/graphiql-$graphiql/graphiql.min.css" graphiql.min.css
gz "$tmp/react-$react/umd/react.production.min.js" react.production.min.js
gz "$tmp/react-dom-$react/umd/react-dom.production.min.js" react-dom.production.min.js
printf 'graphiql %s\nreact %s\nreact-dom %s\n' "$graphiql" "$react" "$react" >"$out/VERSIONS"
(cd "$out" && sha256sum ./*.gz >SHA256SUMS)
echo "updated $out"
