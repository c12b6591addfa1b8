#!/bin/sh
# Entrypoint of localhost/querywarden-postgres:15 (scripts/build-node-images.sh): what the
# official postgres image's docker-entrypoint.sh does for the test node, in POSIX sh.
#
#   - With no arguments, or options only, the command is `postgres` (plus those options).
#   - On the first start (no $PGDATA/PG_VERSION) it runs initdb as POSTGRES_USER (default
#     postgres) with POSTGRES_PASSWORD, creates POSTGRES_DB (default: POSTGRES_USER),
#     listens on '*' and lets any address in with scram-sha-256 (Unix sockets inside the
#     container: trust), then runs /docker-entrypoint-initdb.d/*.sql (psql) and *.sh (sh)
#     in name order against a server that listens on no TCP address, and stops it.
#   - Then it execs the command: postgres stays the container's main process, in the
#     foreground. The image's STOPSIGNAL is SIGINT, postgres's fast shutdown (SIGTERM is
#     its "smart" one, which waits for every client to disconnect).
#
# Who runs it, and where the data goes. The image's USER is postgres, 999:999, so pods
# with runAsNonRoot work. PostgreSQL insists on owning its data directory (initdb chmods it
# to 0700, the server refuses one it does not own), and a fresh volume's root is root's:
# an emptyDir is root's with mode 0777, a new PersistentVolume root's, fsGroup giving the
# group write access, never the ownership. So:
#   - started as 999 (the default) with PGDATA the root of such a volume, one 999 may write
#     but not own, the cluster goes into the subdirectory pgdata of it, as the official
#     image's documentation advises doing by hand (PGDATA=/var/lib/postgresql/data/pgdata).
#     An emptyDir at /var/lib/postgresql/data thus just works; another volume needs
#     fsGroup: 999. Each later start finds the cluster there (PG_VERSION) again;
#   - started as root (runAsUser: 0, or `podman run --user 0`), it creates and chowns
#     PGDATA and /run/postgresql to 999:999 and re-executes itself as 999:999 through
#     setpriv (util-linux): any volume works, the cluster is PGDATA itself, and the
#     database never runs as root.
# The first is the robust default: no root and no capabilities in the pod. Other uids are
# not supported (initdb wants the uid in /etc/passwd).
set -eu

: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${POSTGRES_HOST_AUTH_METHOD:=scram-sha-256}"
export PGDATA
PG_UID=999
PG_GID=999

log() { printf 'docker-entrypoint: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- postgres "$@"
fi
if [ "$1" != postgres ]; then
    exec "$@" # psql, bash, ...: as the image's user, nothing prepared
fi

# A cluster an earlier start as 999 made in the volume's subdirectory (see above).
if [ ! -s "$PGDATA/PG_VERSION" ] && [ -s "$PGDATA/pgdata/PG_VERSION" ]; then
    PGDATA=$PGDATA/pgdata
fi

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /run/postgresql
    # Only what is not the postgres user's already: a big existing cluster costs nothing.
    find "$PGDATA" /run/postgresql \! -user "$PG_UID" -exec chown "$PG_UID:$PG_GID" {} +
    chmod 0700 "$PGDATA"
    chmod 2775 /run/postgresql
    export HOME=/var/lib/postgresql
    exec setpriv --reuid="$PG_UID" --regid="$PG_GID" --clear-groups -- "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA" 2>/dev/null || true
    owner=$(stat -c %u "$PGDATA" 2>/dev/null) || die "cannot create PGDATA $PGDATA as uid $(id -u)"
    if [ "$owner" != "$(id -u)" ]; then
        if [ ! -w "$PGDATA" ] || [ ! -x "$PGDATA" ]; then
            die "PGDATA $PGDATA is uid $owner's and uid $(id -u) may not write in it:" \
                "give the pod fsGroup: $PG_GID, or start the container as root to have it chowned"
        fi
        log "PGDATA $PGDATA is uid $owner's (a volume's root): the cluster goes into $PGDATA/pgdata"
        PGDATA=$PGDATA/pgdata
        mkdir -p "$PGDATA"
    fi
    if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$POSTGRES_HOST_AUTH_METHOD" != trust ]; then
        die "POSTGRES_PASSWORD is not set (or set POSTGRES_HOST_AUTH_METHOD=trust to go without)"
    fi

    log "initialising $PGDATA for $POSTGRES_USER"
    # The password reaches initdb through a pipe, never a file.
    # shellcheck disable=SC2086 # POSTGRES_INITDB_ARGS is a list of options
    printf '%s\n' "${POSTGRES_PASSWORD:-}" | initdb --pgdata="$PGDATA" --username="$POSTGRES_USER" \
        ${POSTGRES_PASSWORD:+--pwfile=/dev/stdin} --auth-local=trust \
        --auth-host="$POSTGRES_HOST_AUTH_METHOD" --encoding=UTF8 --locale=C.UTF-8 \
        ${POSTGRES_INITDB_ARGS:-} >/dev/null
    printf "\nlisten_addresses = '*'\n" >>"$PGDATA/postgresql.conf"
    printf '\nhost all all all %s\n' "$POSTGRES_HOST_AUTH_METHOD" >>"$PGDATA/pg_hba.conf"

    # The init scripts run against a server reachable only through its Unix socket.
    pg_ctl --pgdata="$PGDATA" --options="-c listen_addresses=''" --wait --silent start
    psql_init() { psql -X -v ON_ERROR_STOP=1 --username="$POSTGRES_USER" --no-password "$@"; }
    if [ "$POSTGRES_DB" != postgres ]; then
        printf 'CREATE DATABASE :"db";\n' | psql_init --dbname=postgres -v db="$POSTGRES_DB" >/dev/null
    fi
    for script in /docker-entrypoint-initdb.d/*; do
        case $script in
        *.sql)
            log "running $script"
            psql_init --dbname="$POSTGRES_DB" --file="$script"
            ;;
        *.sh)
            log "running $script"
            sh "$script"
            ;;
        *) [ ! -e "$script" ] || log "ignoring $script" ;;
        esac
    done
    pg_ctl --pgdata="$PGDATA" --mode=fast --wait --silent stop
    log "PostgreSQL init process complete; ready for start up"
fi

exec "$@"
