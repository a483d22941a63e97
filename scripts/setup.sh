#!/usr/bin/env bash
# Make the local servers ready for Kausal's tests and demo (Debian 12).
#
#   PostgreSQL 15  127.0.0.1:5432  wal_level=logical, trust auth on loopback (incl. replication)
#   MariaDB 10.11  127.0.0.1:3306  binlog ROW/FULL/FULL, GTID strict, user kausal/kausal
#   RabbitMQ       127.0.0.1:5672  guest/guest (left as it is)
#   Redis          127.0.0.1:6379
#   nx-27017       127.0.0.1:27017 MongoDB wire protocol on SQLite (PyPI), for the mongo sink's
#                  tests; real MongoDB for users: docker compose --profile mongo up
#
# Idempotent: packages are installed only when a binary is missing, config
# files are written only when their content differs, and a server is
# restarted only when its running settings differ from the wanted ones.
# A second run changes nothing and restarts nothing.
#
# Run as root (or as a user with passwordless sudo). Safe under CI=true:
# never prompts. Exits non-zero with a message when a server can't be made
# ready.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

START_TS=$(date +%s.%N)

log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- privileges
if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
  as_postgres() { runuser -u postgres -- "$@"; }
else
  command -v sudo >/dev/null 2>&1 || die "not root and sudo is not installed"
  sudo -n true 2>/dev/null || die "not root and sudo needs a password (run as root or with passwordless sudo)"
  SUDO=(sudo -n)
  as_postgres() { sudo -n -u postgres -- "$@"; }
fi
root() { "${SUDO[@]}" "$@"; }

# Write $2 (content) to $1 only when it differs. Returns 0 when the file changed.
write_if_changed() {
  local path=$1 content=$2 tmp
  tmp=$(mktemp)
  printf '%s\n' "$content" >"$tmp"
  if root test -f "$path" && root cmp -s "$tmp" "$path"; then
    rm -f "$tmp"
    return 1
  fi
  root install -D -m 0644 "$tmp" "$path"
  rm -f "$tmp"
  return 0
}

# Poll "$@" once a second until it succeeds or $1 seconds pass.
wait_for() {
  local secs=$1; shift
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 1
  done
}

# ------------------------------------------------------------------ packages
pg_server_present() { compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; }

missing_pkgs=()
{ pg_server_present && command -v pg_ctlcluster >/dev/null; } || missing_pkgs+=(postgresql)
{ command -v psql >/dev/null && command -v pg_isready >/dev/null; } || missing_pkgs+=(postgresql-client)
command -v pgbench >/dev/null || missing_pkgs+=(postgresql-contrib)
{ [ -x /usr/sbin/mariadbd ] && command -v mariadb-install-db >/dev/null; } || missing_pkgs+=(mariadb-server)
{ command -v mariadb >/dev/null && command -v mariadb-admin >/dev/null; } || missing_pkgs+=(mariadb-client)
{ command -v redis-server >/dev/null && command -v redis-cli >/dev/null; } || missing_pkgs+=(redis-server)
{ command -v rabbitmq-server >/dev/null && command -v rabbitmqctl >/dev/null; } || missing_pkgs+=(rabbitmq-server)
# The benchmark scripts (scripts/bench.sh) compute rates with bc and python3.
command -v bc >/dev/null || missing_pkgs+=(bc)
command -v python3 >/dev/null || missing_pkgs+=(python3)

if [ "${#missing_pkgs[@]}" -gt 0 ]; then
  log "installing missing packages: ${missing_pkgs[*]}"
  root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null \
    || die "apt-get update failed"
  root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${missing_pkgs[@]}" >/dev/null \
    || die "apt-get install ${missing_pkgs[*]} failed"
fi

# ================================================================ PostgreSQL
PG_STATE="unchanged"
PG_WANT_WAL_LEVEL=logical
PG_WANT_SLOTS=64
PG_WANT_SENDERS=64

# shellcheck disable=SC2012  # version dirs: plain names
PG_VER=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1 || true)
if [ -z "$PG_VER" ] || [ ! -f "/etc/postgresql/$PG_VER/main/postgresql.conf" ]; then
  # No cluster yet (e.g. create_main_cluster = false): create main.
  # shellcheck disable=SC2012
  PG_VER=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n1 || true)
  [ -n "$PG_VER" ] || die "postgres: no server version found under /usr/lib/postgresql"
  log "postgres: creating cluster $PG_VER/main"
  root pg_createcluster "$PG_VER" main >/dev/null || die "postgres: pg_createcluster $PG_VER main failed"
  PG_STATE="created"
fi
PG_ETC=/etc/postgresql/$PG_VER/main
PG_CONF=$PG_ETC/postgresql.conf
PG_HBA=$PG_ETC/pg_hba.conf
PG_PORT=$(pg_lsclusters -h 2>/dev/null | awk -v v="$PG_VER" '$1==v && $2=="main" {print $3}')
PG_PORT=${PG_PORT:-5432}

# conf.d/kausal.conf (Debian's postgresql.conf has include_dir = 'conf.d').
if ! root grep -Eq "^[[:space:]]*include_dir[[:space:]]*=?[[:space:]]*'conf\.d'" "$PG_CONF"; then
  log "postgres: adding include_dir = 'conf.d' to $PG_CONF"
  printf "\ninclude_dir = 'conf.d'\t# added by kausal scripts/setup.sh\n" | root tee -a "$PG_CONF" >/dev/null
fi
if write_if_changed "$PG_ETC/conf.d/kausal.conf" "# Written by kausal scripts/setup.sh: logical decoding for CDC.
wal_level = $PG_WANT_WAL_LEVEL
max_replication_slots = $PG_WANT_SLOTS
max_wal_senders = $PG_WANT_SENDERS"; then
  log "postgres: wrote $PG_ETC/conf.d/kausal.conf"
fi

# pg_hba.conf: trust on loopback, for normal and replication connections.
hba_lines=(
  "local replication all trust"
  "host all all 127.0.0.1/32 trust"
  "host replication all 127.0.0.1/32 trust"
  "host all all ::1/128 trust"
  "host replication all ::1/128 trust"
)
hba_norm=$(root cat "$PG_HBA" | sed -e 's/#.*//' | awk 'NF {$1=$1; print}')
hba_missing=()
for l in "${hba_lines[@]}"; do
  grep -qxF "$l" <<<"$hba_norm" || hba_missing+=("$l")
done
PG_HBA_CHANGED=0
if [ "${#hba_missing[@]}" -gt 0 ]; then
  log "postgres: adding to top of $PG_HBA: $(IFS=';'; echo "${hba_missing[*]}")"
  tmp=$(mktemp)
  {
    echo "# kausal scripts/setup.sh: trust on loopback (tests, logical replication)"
    printf '%s\n' "${hba_missing[@]}"
    echo
    root cat "$PG_HBA"
  } >"$tmp"
  root install -m 0640 -o postgres -g postgres "$tmp" "$PG_HBA"
  rm -f "$tmp"
  PG_HBA_CHANGED=1
fi

pg_running() { pg_lsclusters -h 2>/dev/null | awk -v v="$PG_VER" '$1==v && $2=="main" {print $4}' | grep -q '^online'; }
pg_ready() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; }
pg_wait() {
  wait_for 60 pg_ready || die "postgres: not accepting connections on 127.0.0.1:$PG_PORT after 60 s (see /var/log/postgresql/postgresql-$PG_VER-main.log)"
}
# psql as the postgres OS user over the unix socket (works with Debian's default peer auth too).
pg_sql() { as_postgres psql -X -q -At -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres -c "$1"; }
pg_ctl() { root pg_ctlcluster --skip-systemctl-redirect "$PG_VER" main "$1"; }

if ! pg_running; then
  log "postgres: starting $PG_VER/main"
  pg_ctl start || die "postgres: pg_ctlcluster $PG_VER main start failed (see /var/log/postgresql/postgresql-$PG_VER-main.log)"
  [ "$PG_STATE" = "created" ] || PG_STATE="started"
  PG_HBA_CHANGED=0
fi
pg_wait

pg_current() {
  pg_sql "SELECT string_agg(name || '=' || setting, ' ' ORDER BY name) FROM pg_settings
          WHERE name IN ('wal_level','max_replication_slots','max_wal_senders')"
}
PG_WANT="max_replication_slots=$PG_WANT_SLOTS max_wal_senders=$PG_WANT_SENDERS wal_level=$PG_WANT_WAL_LEVEL"
pg_have=$(pg_current) || die "postgres: cannot query settings as the postgres user"
if [ "$pg_have" != "$PG_WANT" ]; then
  log "postgres: restarting ($pg_have -> $PG_WANT)"
  pg_ctl restart || die "postgres: pg_ctlcluster $PG_VER main restart failed (see /var/log/postgresql/postgresql-$PG_VER-main.log)"
  PG_STATE="restarted"
  pg_wait
  pg_have=$(pg_current)
  if [ "$pg_have" != "$PG_WANT" ]; then
    src=$(pg_sql "SELECT string_agg(name || ' from ' || coalesce(sourcefile,source) || coalesce(':' || sourceline,''), ', ')
                  FROM pg_settings WHERE name IN ('wal_level','max_replication_slots','max_wal_senders')" || true)
    die "postgres: settings still '$pg_have' after restart, want '$PG_WANT' (overridden? $src)"
  fi
elif [ "$PG_HBA_CHANGED" = 1 ]; then
  log "postgres: reloading (pg_hba.conf changed)"
  pg_ctl reload || die "postgres: reload failed"
  [ "$PG_STATE" != "unchanged" ] || PG_STATE="reloaded"
fi

# Roles: postgres and root, both superusers.
for role in postgres root; do
  pg_sql "DO \$\$BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$role') THEN
              CREATE ROLE \"$role\" SUPERUSER LOGIN;
            ELSIF NOT (SELECT rolsuper AND rolcanlogin FROM pg_roles WHERE rolname = '$role') THEN
              ALTER ROLE \"$role\" SUPERUSER LOGIN;
            END IF;
          END\$\$;" || die "postgres: cannot ensure role $role"
done
# A database named like the root role, so a bare `psql` as root works.
if [ -z "$(pg_sql "SELECT 1 FROM pg_database WHERE datname = 'root'")" ]; then
  pg_sql 'CREATE DATABASE root OWNER root' >/dev/null || die "postgres: cannot create database root"
fi

# The check the tests depend on: TCP + trust + logical.
wl=$(psql -X -At -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -c 'SHOW wal_level' 2>&1) \
  || die "postgres: 'psql -h 127.0.0.1 -U postgres' fails: $wl"
[ "$wl" = "logical" ] || die "postgres: wal_level is '$wl' over TCP, want logical"
PG_LINE="postgres: ready ($PG_VER/main on 127.0.0.1:$PG_PORT, wal_level=$wl, max_replication_slots=$PG_WANT_SLOTS) [$PG_STATE]"

# =================================================================== MariaDB
MY_STATE="unchanged"
MY_CNF_DIR=/etc/mysql/mariadb.conf.d
MY_CNF=$MY_CNF_DIR/60-kausal.cnf
MY_DATADIR=/var/lib/mysql

if write_if_changed "$MY_CNF" "# Written by kausal scripts/setup.sh: binlog for CDC.
[mariadbd]
server_id           = 1
log_bin             = mariadb-bin
binlog_format       = ROW
binlog_row_image    = FULL
binlog_row_metadata = FULL
gtid_strict_mode    = ON
log_slave_updates   = ON
expire_logs_days    = 2"; then
  log "mariadb: wrote $MY_CNF"
fi

# Debian's /etc/mysql/my.cnf (-> mariadb.cnf) includes mariadb.conf.d/; a
# hand-written my.cnf may not. Make sure the server actually reads our file.
my_reads_cnf() { /usr/sbin/mariadbd --print-defaults 2>/dev/null | grep -q -- '--binlog_row_metadata=FULL'; }
if ! my_reads_cnf; then
  main_cnf=$(readlink -f /etc/mysql/my.cnf 2>/dev/null || echo /etc/mysql/my.cnf)
  log "mariadb: $main_cnf does not include $MY_CNF_DIR/, adding !includedir"
  printf '\n# added by kausal scripts/setup.sh\n!includedir %s/\n' "$MY_CNF_DIR" | root tee -a "$main_cnf" >/dev/null
  my_reads_cnf || die "mariadb: mariadbd --print-defaults still doesn't show $MY_CNF"
fi

my_sql() { root mariadb --batch --skip-column-names -e "$1"; }   # root via unix socket
my_ready() { my_sql 'SELECT 1'; }
my_pid() { pgrep -x mariadbd | head -n1; }
my_start() {
  root install -d -o mysql -g mysql -m 0755 /run/mysqld
  if [ ! -d "$MY_DATADIR/mysql" ]; then
    log "mariadb: initialising $MY_DATADIR"
    root mariadb-install-db --user=mysql --datadir="$MY_DATADIR" >/dev/null \
      || die "mariadb: mariadb-install-db failed"
  fi
  # Same way the machine starts it; --user=mysql so it never tries to run as root.
  root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql \
    || die "mariadb: start-stop-daemon could not start /usr/sbin/mariadbd"
  wait_for 60 my_ready || die "mariadb: not answering 'select 1' over the socket after 60 s (see /var/log/mysql/error.log)"
}
my_stop() {
  local pid
  pid=$(my_pid || true)
  root mariadb-admin shutdown || die "mariadb: 'mariadb-admin shutdown' failed"
  if [ -n "$pid" ]; then
    local deadline=$((SECONDS + 60))
    while root kill -0 "$pid" 2>/dev/null; do
      [ "$SECONDS" -lt "$deadline" ] || die "mariadb: mariadbd (pid $pid) still running 60 s after shutdown"
      sleep 0.5
    done
  fi
}

if ! my_ready >/dev/null 2>&1; then
  if [ -n "$(my_pid || true)" ]; then
    # Running but not answering yet (e.g. just started): give it time.
    wait_for 60 my_ready || die "mariadb: mariadbd is running but not answering over the socket (see /var/log/mysql/error.log)"
  else
    log "mariadb: starting"
    my_start
    MY_STATE="started"
  fi
fi

MY_CHECK="SELECT CONCAT_WS(' ', @@log_bin+0, @@binlog_format, @@binlog_row_image, @@binlog_row_metadata,
                  @@gtid_strict_mode+0, @@log_slave_updates+0, @@server_id, ROUND(@@expire_logs_days))"
MY_WANT="1 ROW FULL FULL 1 1 1 2"
my_have=$(my_sql "$MY_CHECK") || die "mariadb: cannot query settings"
if [ "$my_have" != "$MY_WANT" ]; then
  log "mariadb: restarting (log_bin,format,row_image,row_metadata,gtid_strict,log_slave_updates,server_id,expire_days: '$my_have' -> '$MY_WANT')"
  my_stop
  my_start
  MY_STATE="restarted"
  my_have=$(my_sql "$MY_CHECK")
  [ "$my_have" = "$MY_WANT" ] || die "mariadb: settings still '$my_have' after restart, want '$MY_WANT'"
fi

# Test user over TCP (root only connects via the socket).
my_sql "
  CREATE USER IF NOT EXISTS 'kausal'@'%'         IDENTIFIED BY 'kausal';
  CREATE USER IF NOT EXISTS 'kausal'@'localhost' IDENTIFIED BY 'kausal';
  CREATE USER IF NOT EXISTS 'kausal'@'127.0.0.1' IDENTIFIED BY 'kausal';
  GRANT ALL PRIVILEGES ON *.* TO 'kausal'@'%'         WITH GRANT OPTION;
  GRANT ALL PRIVILEGES ON *.* TO 'kausal'@'localhost' WITH GRANT OPTION;
  GRANT ALL PRIVILEGES ON *.* TO 'kausal'@'127.0.0.1' WITH GRANT OPTION;
" || die "mariadb: cannot create user kausal"
mariadb --batch --skip-column-names -h 127.0.0.1 -P 3306 -u kausal -pkausal -e 'SELECT 1' >/dev/null 2>&1 \
  || die "mariadb: user kausal/kausal cannot log in over 127.0.0.1:3306"
MY_VER=$(my_sql 'SELECT VERSION()')
MY_LINE="mariadb: ready (${MY_VER%%-*} on 127.0.0.1:3306, log_bin=ON binlog_format=ROW row_image=FULL row_metadata=FULL, user kausal/kausal) [$MY_STATE]"

# ================================================================== RabbitMQ
RMQ_STATE="unchanged"
rmq_up() { root timeout 10 rabbitmqctl -q await_startup; }
if ! root timeout 5 rabbitmqctl -q await_startup >/dev/null 2>&1; then
  log "rabbitmq: starting (rabbitmq-server -detached)"
  root rabbitmq-server -detached >/dev/null 2>&1 || die "rabbitmq: 'rabbitmq-server -detached' failed"
  wait_for 90 rmq_up || die "rabbitmq: not started after 90 s (rabbitmqctl await_startup; see /var/log/rabbitmq/)"
  RMQ_STATE="started"
fi
RMQ_VER=$(root rabbitmqctl -q version 2>/dev/null || echo '?')
RMQ_LINE="rabbitmq: ready ($RMQ_VER on 127.0.0.1:5672, guest/guest) [$RMQ_STATE]"

# ===================================================================== Redis
REDIS_STATE="unchanged"
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]; }
if ! redis_up; then
  log "redis: starting"
  root install -d /var/lib/redis /var/log/redis
  root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log >/dev/null \
    || die "redis: redis-server failed to start (see /var/log/redis/ci.log)"
  wait_for 20 redis_up || die "redis: no PONG on 127.0.0.1:6379 after 20 s (see /var/log/redis/ci.log)"
  REDIS_STATE="started"
fi
REDIS_VER=$(redis-cli -h 127.0.0.1 -p 6379 info server 2>/dev/null | tr -d '\r' | awk -F: '$1=="redis_version"{print $2}')
REDIS_LINE="redis: ready (${REDIS_VER:-?} on 127.0.0.1:6379) [$REDIS_STATE]"

# ================================================================== nx-27017
# No MongoDB server is packaged for Debian; nx-27017 speaks its wire protocol (the mongo
# sink's tests run against it; KAUSAL_TEST_MONGO_URL points them at a real one).
# Skip with KAUSAL_SETUP_MONGO=0.
NX_LINE="nx-27017: skipped (KAUSAL_SETUP_MONGO=0)"
if [ "${KAUSAL_SETUP_MONGO:-1}" != "0" ]; then
  NX_VERSION=0.8.1
  NX_STATE="unchanged"
  NX_BIN=$(command -v nx-27017 || true)
  if [ -z "$NX_BIN" ] || ! "$NX_BIN" --help >/dev/null 2>&1; then
    NX_BIN=/opt/kausal-nx/bin/nx-27017
    if [ ! -x "$NX_BIN" ]; then
      log "nx-27017: installing $NX_VERSION into /opt/kausal-nx (a virtualenv)"
      if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
        root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >/dev/null \
          || die "nx-27017: apt-get install python3-venv failed"
      fi
      root python3 -m venv /opt/kausal-nx || die "nx-27017: cannot create /opt/kausal-nx"
      root /opt/kausal-nx/bin/pip install -q "nx-27017==$NX_VERSION" \
        || die "nx-27017: pip install nx-27017==$NX_VERSION failed (is PyPI reachable?)"
      NX_STATE="installed"
    fi
  fi
  nx_up() { (exec 3<>/dev/tcp/127.0.0.1/27017) 2>/dev/null; }
  if ! nx_up; then
    log "nx-27017: starting on 127.0.0.1:27017 (data in /var/lib/kausal-nx)"
    root install -d /var/lib/kausal-nx
    root "$NX_BIN" -d --host 127.0.0.1 --port 27017 --data-dir /var/lib/kausal-nx \
      --log-file /var/log/nx-27017.log --pid-file /run/nx-27017.pid >/dev/null 2>&1 \
      || die "nx-27017: failed to start (see /var/log/nx-27017.log)"
    wait_for 20 nx_up || die "nx-27017: not listening on 127.0.0.1:27017 after 20 s (see /var/log/nx-27017.log)"
    NX_STATE="started"
  fi
  NX_LINE="nx-27017: ready (MongoDB wire protocol on 127.0.0.1:27017) [$NX_STATE]"
fi

# =================================================================== summary
printf '%s\n' "$PG_LINE" "$MY_LINE" "$RMQ_LINE" "$REDIS_LINE" "$NX_LINE"
awk -v s="$START_TS" -v e="$(date +%s.%N)" 'BEGIN { printf "setup: done in %.1f s\n", e - s }'
