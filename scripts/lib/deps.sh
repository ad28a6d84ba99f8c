# Shared by scripts/test, scripts/demo and scripts/bench: make sure the services the project
# needs are installed (Debian packages, when run as root) and reachable. Sourced, not run.

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

apt_updated=""
apt_install() {
    if [ "$(id -u)" != 0 ]; then
        die "$* is missing and installing it needs root. Run as root, or install it yourself: sudo apt-get install -y $*"
    fi
    if [ -z "$apt_updated" ]; then
        say "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        apt_updated=1
    fi
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# redis-server must be on PATH: tests start their own servers on free ports.
ensure_redis_server() {
    command -v redis-server >/dev/null 2>&1 || apt_install redis-server
    # Debian's package may start a system instance; tests do not need it, but leave it alone.
    command -v redis-server >/dev/null 2>&1 || die "redis-server still not found after install"
}

# ps, kill, pkill (procps): minimal Debian images lack them; some tests and scripts use them.
ensure_procps() {
    command -v ps >/dev/null 2>&1 || apt_install procps
    command -v ps >/dev/null 2>&1 || die "ps still not found after installing procps"
}

# A PostgreSQL server tests may create databases on; exports SD_TEST_POSTGRES_URL.
ensure_postgres() {
    if [ -n "${SD_TEST_POSTGRES_URL:-}" ]; then
        return
    fi
    local trust_url="postgres://postgres@127.0.0.1:5432/postgres"
    if command -v psql >/dev/null 2>&1 && psql "$trust_url" -Atqc 'select 1' >/dev/null 2>&1; then
        export SD_TEST_POSTGRES_URL="$trust_url"
        return
    fi
    if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        apt_install postgresql postgresql-client
    fi
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)
    [ -n "$version" ] || die "PostgreSQL is installed but has no cluster under /etc/postgresql"
    if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
        say "starting PostgreSQL $version"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null \
            || pg_ctlcluster "$version" main start \
            || die "could not start PostgreSQL $version (pg_ctlcluster $version main start)"
        for _ in $(seq 1 50); do
            pg_isready -h 127.0.0.1 -p 5432 -q && break
            sleep 0.2
        done
    fi
    if psql "$trust_url" -Atqc 'select 1' >/dev/null 2>&1; then
        export SD_TEST_POSTGRES_URL="$trust_url"
        return
    fi
    # Debian's default: password auth over TCP. Give the postgres role a test password.
    [ "$(id -u)" = 0 ] || die "PostgreSQL refuses postgres@127.0.0.1; set SD_TEST_POSTGRES_URL to a URL whose user may CREATE DATABASE"
    runuser -u postgres -- psql -Atqc "ALTER USER postgres PASSWORD 'sd-test'" >/dev/null \
        || die "could not set a password for the postgres role"
    export SD_TEST_POSTGRES_URL="postgres://postgres:sd-test@127.0.0.1:5432/postgres"
    psql "$SD_TEST_POSTGRES_URL" -Atqc 'select 1' >/dev/null 2>&1 \
        || die "PostgreSQL still refuses $SD_TEST_POSTGRES_URL"
}

# A free TCP port on 127.0.0.1.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()' 2>/dev/null \
        || echo $((20000 + RANDOM % 20000))
}
