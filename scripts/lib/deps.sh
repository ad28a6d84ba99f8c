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

# Chromium and its WebDriver (Debian's chromium and chromium-driver), for the status pages'
# browser test (scheduler/tests/browser.rs).
ensure_chromium() {
    if ! command -v chromedriver >/dev/null 2>&1 || ! [ -x /usr/bin/chromium ]; then
        apt_install chromium chromium-driver
    fi
    command -v chromedriver >/dev/null 2>&1 || die "chromedriver still not found after installing chromium-driver"
}

# promtool (Debian's prometheus package ships it), for the alert rules' unit tests.
ensure_promtool() {
    command -v promtool >/dev/null 2>&1 || apt_install prometheus
    command -v promtool >/dev/null 2>&1 || die "promtool still not found after installing prometheus"
}

# ps, kill, pkill (procps): minimal Debian images lack them; some tests and scripts use them.
ensure_procps() {
    command -v ps >/dev/null 2>&1 || apt_install procps
    command -v ps >/dev/null 2>&1 || die "ps still not found after installing procps"
}

# A PostgreSQL server tests may create databases on; exports SD_TEST_POSTGRES_URL.
# A URL already in SD_TEST_POSTGRES_URL is used as it is (its user must be allowed to CREATE
# DATABASE). Otherwise: the local Debian cluster (pg_lsclusters; installed with apt and started
# when needed, as root), its port from pg_lsclusters, and a dedicated role sd_test (LOGIN
# CREATEDB, no superuser) with the password below, created when missing — each test creates and
# drops a database of its own, which CREATEDB allows.
SD_TEST_POSTGRES_ROLE=sd_test
SD_TEST_POSTGRES_PASSWORD=sd-test
ensure_postgres() {
    if [ -n "${SD_TEST_POSTGRES_URL:-}" ]; then
        say "PostgreSQL: SD_TEST_POSTGRES_URL is set; using it as it is"
        return
    fi
    if ! command -v pg_lsclusters >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || die "PostgreSQL is not installed here and installing it needs root: run as root, install it yourself (sudo apt-get install -y postgresql postgresql-client), or set SD_TEST_POSTGRES_URL to a server whose user may CREATE DATABASE"
        apt_install postgresql postgresql-client
    fi
    command -v psql >/dev/null 2>&1 || apt_install postgresql-client

    # The cluster: the first one online, else the newest one (pg_lsclusters sorts by version).
    local clusters line version name port status
    clusters=$(pg_lsclusters --no-header 2>/dev/null || true)
    [ -n "$clusters" ] || die "PostgreSQL is installed but has no cluster (pg_lsclusters lists none); create one: pg_createcluster --start <version> main"
    line=$(awk '$4 == "online" { print; exit }' <<<"$clusters")
    [ -n "$line" ] || line=$(tail -n1 <<<"$clusters")
    read -r version name port status _ <<<"$line"
    if [ "$status" != online ]; then
        [ "$(id -u)" = 0 ] || die "PostgreSQL $version/$name is $status and starting it needs root: sudo pg_ctlcluster $version $name start"
        say "starting PostgreSQL $version/$name (port $port)"
        pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start 2>/dev/null \
            || pg_ctlcluster "$version" "$name" start \
            || die "could not start PostgreSQL $version/$name (pg_ctlcluster $version $name start)"
    fi
    for _ in $(seq 1 50); do
        pg_isready -h 127.0.0.1 -p "$port" -q 2>/dev/null && break
        sleep 0.2
    done
    pg_isready -h 127.0.0.1 -p "$port" -q 2>/dev/null \
        || die "PostgreSQL $version/$name does not accept connections on 127.0.0.1:$port (see pg_lsclusters and its log)"

    local role=$SD_TEST_POSTGRES_ROLE password=$SD_TEST_POSTGRES_PASSWORD
    local url="postgres://$role:$password@127.0.0.1:$port/postgres"
    if [ "$(psql "$url" -Atqc "SELECT rolcreatedb FROM pg_roles WHERE rolname = current_user" 2>/dev/null)" = t ]; then
        say "PostgreSQL $version/$name on 127.0.0.1:$port: tests use the existing role $role (LOGIN CREATEDB)"
        export SD_TEST_POSTGRES_URL="$url"
        return
    fi
    # Create (or repair) the role, as the postgres superuser: over the local socket as root
    # (Debian's peer authentication), else over TCP when the server trusts local connections.
    local admin_psql
    if [ "$(id -u)" = 0 ]; then
        admin_psql=(runuser -u postgres -- psql -p "$port" -v ON_ERROR_STOP=1 -Atq)
    else
        admin_psql=(psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -w -v ON_ERROR_STOP=1 -Atq)
    fi
    local exists
    if ! exists=$("${admin_psql[@]}" -c "SELECT count(*) FROM pg_roles WHERE rolname = '$role'" 2>/dev/null); then
        die "cannot reach PostgreSQL $version/$name as its superuser to create the test role. Create it yourself: sudo -u postgres psql -p $port -c \"CREATE ROLE $role LOGIN CREATEDB PASSWORD '$password'\" — or set SD_TEST_POSTGRES_URL to a URL whose user may CREATE DATABASE"
    fi
    if [ "$exists" = 0 ]; then
        "${admin_psql[@]}" -c "CREATE ROLE $role LOGIN CREATEDB PASSWORD '$password'" >/dev/null \
            || die "could not create the PostgreSQL role $role"
        say "PostgreSQL $version/$name on 127.0.0.1:$port: created role $role (LOGIN CREATEDB, not a superuser) for the tests"
    else
        "${admin_psql[@]}" -c "ALTER ROLE $role LOGIN CREATEDB PASSWORD '$password'" >/dev/null \
            || die "could not update the PostgreSQL role $role"
        say "PostgreSQL $version/$name on 127.0.0.1:$port: role $role existed but could not log in or create databases; reset it to LOGIN CREATEDB with the test password"
    fi
    psql "$url" -Atqc 'SELECT 1' >/dev/null 2>&1 \
        || die "PostgreSQL refuses $role on 127.0.0.1:$port even with its password: check pg_hba.conf for host connections from 127.0.0.1 (md5 or scram-sha-256)"
    export SD_TEST_POSTGRES_URL="$url"
}

# A free TCP port on 127.0.0.1.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()' 2>/dev/null \
        || echo $((20000 + RANDOM % 20000))
}

# kubernetes-validate (PyPI): the official Kubernetes OpenAPI schemas as JSON Schema, one set per
# Kubernetes minor, strict variants included. agent/tests/schema.rs runs it over every build pod
# the agent makes and every object in deploy/kubernetes/. Exports SD_KUBERNETES_VALIDATE, the
# absolute path of its command. Pinned: a release carries the schemas of every Kubernetes minor
# from 1.25 up to its own version (1.37.0: 1.25–1.37), and the test needs the newest one we
# support. Raise the pin when agent/tests/schema.rs supports a newer Kubernetes.
KUBERNETES_VALIDATE_VERSION=1.37.0
ensure_kubernetes_validate() {
    _ensure_pip_tool kubernetes-validate "$KUBERNETES_VALIDATE_VERSION" SD_KUBERNETES_VALIDATE
}

# checkov (PyPI): the policy scanner agent/tests/policy.rs runs over deploy/kubernetes/ and the
# build pods the agent makes (its Kubernetes checks; every skipped check is justified where it
# is skipped). Exports SD_CHECKOV, the absolute path of its command; the test also reads YAML
# with the Python beside it (checkov depends on PyYAML). Pinned, so a new release's new checks
# arrive with a deliberate raise of the pin (and a look at what they flag), never mid-CI.
CHECKOV_VERSION=3.3.30
ensure_checkov() {
    _ensure_pip_tool checkov "$CHECKOV_VERSION" SD_CHECKOV
}

# _ensure_pip_tool NAME VERSION VAR: the PyPI package NAME==VERSION, whose command is also NAME,
# installed into its own virtual environment under target/ (ignored by git, removed by cargo
# clean, rebuilt on the next run), never into the system's Python: Debian's python3 refuses
# `pip install` (PEP 668, "externally-managed-environment"), and --break-system-packages would
# mix PyPI's packages with Debian's python3-* ones. Needs python3 (and Debian's python3-venv,
# installed when python3 has no ensurepip) and PyPI. An existing install of the pinned version
# is reused silently (one `--version` call); VAR already set to another command is used as it
# is. Exports VAR, the absolute path of the command.
_ensure_pip_tool() {
    local name=$1 version=$2 var=$3
    local root venv bin preset
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    venv=$root/target/tools/$name
    bin=$venv/bin/$name
    preset=${!var:-}
    if [ -n "$preset" ] && [ "$preset" != "$bin" ]; then
        "$preset" --version >/dev/null 2>&1 \
            || die "$var=$preset does not run ($preset --version failed); unset it to have $name $version installed under target/tools"
        say "$name: $var is set; using $preset ($("$preset" --version 2>&1)) as it is"
        return
    fi
    if [ "$("$bin" --version 2>/dev/null)" = "$version" ]; then
        export "$var=$bin"
        return
    fi

    command -v python3 >/dev/null 2>&1 || apt_install python3
    mkdir -p "$root/target/tools"
    # Scripts started at once in this checkout install it once; the others wait, then reuse it.
    local lock
    exec {lock}>"$root/target/tools/$name.lock"
    flock "$lock" 2>/dev/null || true
    if [ "$("$bin" --version 2>/dev/null)" != "$version" ]; then
        _install_pip_tool "$venv" "$name==$version" || { exec {lock}>&-; die "could not install $name $version into $venv (see above)"; }
    fi
    exec {lock}>&-
    [ "$("$bin" --version 2>/dev/null)" = "$version" ] \
        || die "$name $version still does not run after installing it: $bin --version"
    export "$var=$bin"
}

# The virtual environment $1 with pip and the requirement $2; an existing one is upgraded in
# place when it works, else made again. Prints pip's output only when something fails.
_install_pip_tool() {
    local venv=$1 requirement=$2 log=$1.log
    local started=$SECONDS
    say "installing $requirement from PyPI into ${venv#"$PWD"/}"
    # A user's pip configuration must not send the install elsewhere (--user, --target, --prefix).
    local -a pip_env=(env -u PIP_TARGET -u PIP_PREFIX -u PIP_REQUIRE_VIRTUALENV PIP_USER=0
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1)
    if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
        rm -rf "$venv"
        if ! python3 -m venv "$venv" >"$log" 2>&1; then
            # Debian's python3 without ensurepip: it comes with python3-venv.
            rm -rf "$venv"
            apt_install python3-venv
            python3 -m venv "$venv" >"$log" 2>&1 \
                || { cat "$log" >&2; echo "python3 cannot create a virtual environment (python3 -m venv)" >&2; return 1; }
        fi
    fi
    "${pip_env[@]}" "$venv/bin/python" -m pip install -q "$requirement" >>"$log" 2>&1 \
        || { cat "$log" >&2; return 1; }
    rm -f "$log"
    say "installed $requirement in $((SECONDS - started)) s"
}

# cargo-deny (crates.io), for scripts/deny: checks Cargo.lock against deny.toml (advisories,
# licenses, duplicate versions, sources). Exports SD_CARGO_DENY, the absolute path of its binary.
# Built from source by `cargo install --locked` (cargo-deny's own lock file) into this machine's
# tool cache, $SD_TOOLS_CACHE (default ~/.cache/sd-buildcluster), in a directory named for the
# version: every checkout on the machine (CI clones afresh each run) shares one build, as they
# share cargo's download cache. Pinned; an install of the pinned version is reused (one
# `--version` call). Raise the pin on purpose: a new release can bring new checks, and a new
# Rust version may be required.
#
# It is built unoptimised and without debug info (`--debug`, CARGO_PROFILE_DEV_DEBUG=0), not in
# its release profile (fat LTO, one codegen unit): CI builds it from scratch on every run, and
# the check spends its time in cargo metadata and git either way. Measured on 2 cores, crates
# already downloaded: 63 s (102 s of CPU), against 173 s (245 s of CPU) for a plain
# `cargo install`. `cargo deny check` then takes about 4 s, against 1.5 s optimised.
CARGO_DENY_VERSION=0.20.2
ensure_cargo_deny() {
    local cache dir bin
    cache=${SD_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sd-buildcluster}
    dir=$cache/cargo-deny-$CARGO_DENY_VERSION
    bin=$dir/bin/cargo-deny
    if [ "$("$bin" --version 2>/dev/null)" = "cargo-deny $CARGO_DENY_VERSION" ]; then
        export SD_CARGO_DENY=$bin
        return
    fi

    command -v cargo >/dev/null 2>&1 || die "cargo is not on PATH: cargo-deny is installed with cargo install"
    mkdir -p "$cache"
    # Scripts started at once on this machine install it once; the others wait, then reuse it.
    local lock
    exec {lock}>"$dir.lock"
    flock "$lock" 2>/dev/null || true
    if [ "$("$bin" --version 2>/dev/null)" != "cargo-deny $CARGO_DENY_VERSION" ]; then
        _install_cargo_deny "$dir" || { exec {lock}>&-; die "could not install cargo-deny $CARGO_DENY_VERSION into $dir (see above)"; }
    fi
    exec {lock}>&-
    [ "$("$bin" --version 2>/dev/null)" = "cargo-deny $CARGO_DENY_VERSION" ] \
        || die "cargo-deny $CARGO_DENY_VERSION still does not run after installing it: $bin --version"
    export SD_CARGO_DENY=$bin
}

# cargo-deny $CARGO_DENY_VERSION into the install root $1, built in $1/build (removed after).
# Prints cargo's output only when something fails.
_install_cargo_deny() {
    local dir=$1 log=$1.log start=$SECONDS
    say "installing cargo-deny $CARGO_DENY_VERSION from crates.io into ${dir#"$PWD"/} (about a minute, once)"
    rm -rf "$dir"
    if ! CARGO_PROFILE_DEV_DEBUG=0 cargo install cargo-deny --locked --quiet --debug \
        --version "=$CARGO_DENY_VERSION" --root "$dir" --target-dir "$dir/build" >"$log" 2>&1; then
        cat "$log" >&2
        return 1
    fi
    rm -rf "$dir/build" "$log"
    say "cargo-deny $CARGO_DENY_VERSION installed in $((SECONDS - start)) s"
}

# cargo-fuzz (pinned, from crates.io) under target/tools/cargo-fuzz, on PATH for this script, and
# the nightly toolchain it needs (libFuzzer's instrumentation), installed with rustup when
# missing. For scripts/fuzz only: CI does not fuzz, it replays the corpus on stable.
CARGO_FUZZ_VERSION=0.13.2
ensure_cargo_fuzz() {
    local root dir bin
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    dir=$root/target/tools/cargo-fuzz
    bin=$dir/bin/cargo-fuzz
    if ! cargo +nightly --version >/dev/null 2>&1; then
        command -v rustup >/dev/null 2>&1 || die "the nightly toolchain is missing and rustup is not on PATH to install it"
        say "installing the nightly toolchain (rustup, minimal profile)"
        rustup toolchain install nightly --profile minimal >/dev/null
    fi
    if [ "$("$bin" --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
        say "installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io into ${dir#"$root"/} (about a minute, once)"
        cargo install cargo-fuzz --locked --quiet --version "=$CARGO_FUZZ_VERSION" \
            --root "$dir" --target-dir "$dir/build" \
            || die "could not install cargo-fuzz $CARGO_FUZZ_VERSION into $dir"
        rm -rf "$dir/build"
    fi
    export PATH="$dir/bin:$PATH"
}
