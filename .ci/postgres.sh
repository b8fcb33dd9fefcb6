#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on loopback for the tests; prints its URL on stdout.
# Usage: eval "$(.ci/postgres.sh start)"   (sets MNISTLAB_TEST_POSTGRES and PG_TEST_DIR)
#        .ci/postgres.sh stop "$PG_TEST_DIR"
set -euo pipefail
bin_dir() {
  local initdb
  initdb=$(command -v initdb 2>/dev/null || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$initdb" ] && dirname "$(readlink -f "$initdb")"
}
as_owner() {  # the server refuses to run as root: run it as the postgres user then
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
case "${1:-}" in
  start)
    BIN=$(bin_dir)
    if [ -z "$BIN" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) >&2
      BIN=$(bin_dir)
    fi
    [ -n "$BIN" ] || { echo "postgres.sh: no PostgreSQL server binaries (initdb) found" >&2; exit 1; }
    DIR=$(mktemp -d /tmp/mnistlab-pg.XXXXXX)
    [ "$(id -u)" = 0 ] && chown postgres "$DIR"
    PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_owner "$BIN/initdb" -D "$DIR/data" -U mnistlab --auth=trust >/dev/null
    as_owner "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
      -o "-h 127.0.0.1 -p $PORT -k $DIR -c max_connections=200 -c fsync=off" start >/dev/null
    as_owner "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U mnistlab mnistlab
    echo "export MNISTLAB_TEST_POSTGRES=postgresql://mnistlab@127.0.0.1:$PORT/mnistlab PG_TEST_DIR=$DIR PG_BIN=$BIN"
    ;;
  stop)
    DIR=${2:?data folder}
    BIN=$(bin_dir)
    as_owner "$BIN/pg_ctl" -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$DIR"
    ;;
  *) echo "usage: $0 start | stop DIR" >&2; exit 2 ;;
esac
