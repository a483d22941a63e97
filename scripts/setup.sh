#!/usr/bin/env bash
# Make the local servers ready for Kausal's tests and demo (Debian 12).
#
#   PostgreSQL 15  127.0.0.1:5432  wal_level=logical, trust auth on loopback (incl. replication);
#                                  TLS on the same port (ssl=on), plaintext still allowed
#   MariaDB 10.11  127.0.0.1:3306  binlog ROW/FULL/FULL, GTID strict, user kausal/kausal;
#                                  TLS on the same port (have_ssl=YES)
#   RabbitMQ       127.0.0.1:5672  guest/guest (left as it is)
#                  127.0.0.1:5671  AMQPS (TLS 1.2/1.3, no client certificates)
#   Redis          127.0.0.1:6379
#                  127.0.0.1:6380  TLS (tls-auth-clients no), also on ::1 like 6379
#   nx-27017       127.0.0.1:27017 MongoDB wire protocol on SQLite (PyPI), for the mongo sink's
#                  tests; real MongoDB for users: docker compose --profile mongo up
#                  127.0.0.1:27018 the same through TLS (stunnel, /etc/kausal/stunnel-mongo.conf)
#
# TLS: a test CA made here, /etc/kausal/tls/ca.pem, signs server.pem for DNS:localhost
# only (no IP address: a client of 127.0.0.1 that checks names must refuse it);
# other-ca.pem signs nothing (a wrong CA for tests). Each server reads its own copy.
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

# "a; b; c" for a log line.
join_reasons() { local out; out=$(printf '%s; ' "$@"); printf '%s' "${out%; }"; }

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
# The test CA and server certificates; stunnel puts TLS in front of nx-27017.
command -v openssl >/dev/null || missing_pkgs+=(openssl)
if [ "${KAUSAL_SETUP_MONGO:-1}" != "0" ]; then
  command -v stunnel4 >/dev/null || missing_pkgs+=(stunnel4)
fi

if [ "${#missing_pkgs[@]}" -gt 0 ]; then
  log "installing missing packages: ${missing_pkgs[*]}"
  root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null \
    || die "apt-get update failed"
  root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${missing_pkgs[@]}" >/dev/null \
    || die "apt-get install ${missing_pkgs[*]} failed"
fi

# ======================================================================= TLS
# A test CA and one server certificate for every server's TLS listener. The
# certificate names DNS:localhost only, no IP address: the tests connect to
# localhost for the good path and to 127.0.0.1 to see a name mismatch refused.
# other-ca.pem is an unrelated CA that signed nothing (the tests' wrong CA).
# Files are made only when missing, when server.pem isn't signed by ca.pem, or
# when a certificate expires within 30 days. Each server reads its own copy
# (tls_copy), owned by the user it runs as.
TLS_DIR=/etc/kausal/tls
TLS_CA=$TLS_DIR/ca.pem
TLS_RENEW_SECS=$((30 * 86400))
TLS_EVENTS=()   # what changed, for the summary line

tls_key_matches() {   # $1 certificate, $2 key
  local cert_pub key_pub
  cert_pub=$(root openssl x509 -noout -pubkey -in "$1" 2>/dev/null) || return 1
  key_pub=$(root openssl pkey -pubout -in "$2" 2>/dev/null) || return 1
  [ -n "$cert_pub" ] && [ "$cert_pub" = "$key_pub" ]
}
tls_valid_ca() {      # $1 file stem: ca, other-ca
  root test -s "$TLS_DIR/$1.pem" && root test -s "$TLS_DIR/$1.key" \
    && openssl x509 -checkend "$TLS_RENEW_SECS" -noout -in "$TLS_DIR/$1.pem" >/dev/null 2>&1 \
    && tls_key_matches "$TLS_DIR/$1.pem" "$TLS_DIR/$1.key"
}
tls_valid_server() {
  root test -s "$TLS_DIR/server.pem" && root test -s "$TLS_DIR/server.key" \
    && openssl verify -CAfile "$TLS_CA" "$TLS_DIR/server.pem" >/dev/null 2>&1 \
    && openssl x509 -checkend "$TLS_RENEW_SECS" -noout -in "$TLS_DIR/server.pem" >/dev/null 2>&1 \
    && tls_key_matches "$TLS_DIR/server.pem" "$TLS_DIR/server.key"
}

# Extensions: webpki (rustls) wants v3, a SAN, and no CA:TRUE on the leaf.
TLS_OPENSSL_CNF='[req]
distinguished_name = dn
prompt             = no
[dn]
CN = Kausal
[kausal_ca]
basicConstraints       = critical, CA:TRUE
keyUsage               = critical, keyCertSign, cRLSign
subjectKeyIdentifier   = hash
[kausal_server]
basicConstraints       = critical, CA:FALSE
keyUsage               = critical, digitalSignature, keyEncipherment
extendedKeyUsage       = serverAuth
subjectAltName         = DNS:localhost
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always'
tls_work=""
tls_workdir() {
  [ -n "$tls_work" ] && return
  tls_work=$(root mktemp -d) || die "tls: mktemp -d failed"
  printf '%s\n' "$TLS_OPENSSL_CNF" | root tee "$tls_work/openssl.cnf" >/dev/null
}
# RSA 2048: every server here takes it (Erlang/RabbitMQ included), as does rustls.
tls_genkey() { root openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1" 2>/dev/null; }
tls_make_ca() {       # $1 file stem, $2 common name
  tls_workdir
  if ! { tls_genkey "$tls_work/$1.key" \
         && root openssl req -x509 -new -sha256 -days 3650 -config "$tls_work/openssl.cnf" -extensions kausal_ca \
              -key "$tls_work/$1.key" -subj "/CN=$2" -out "$tls_work/$1.pem" 2>/dev/null; }; then
    die "tls: openssl could not make the CA $TLS_DIR/$1.pem"
  fi
  root install -o root -g root -m 0600 "$tls_work/$1.key" "$TLS_DIR/$1.key"
  root install -o root -g root -m 0644 "$tls_work/$1.pem" "$TLS_DIR/$1.pem"
}
tls_make_server() {
  tls_workdir
  if ! { tls_genkey "$tls_work/server.key" \
         && root openssl req -new -sha256 -config "$tls_work/openssl.cnf" -key "$tls_work/server.key" \
              -subj "/CN=localhost" -out "$tls_work/server.csr" 2>/dev/null \
         && root openssl x509 -req -sha256 -days 825 -in "$tls_work/server.csr" \
              -CA "$TLS_CA" -CAkey "$TLS_DIR/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
              -extfile "$tls_work/openssl.cnf" -extensions kausal_server -out "$tls_work/server.pem" 2>/dev/null; }; then
    die "tls: openssl could not make $TLS_DIR/server.pem"
  fi
  root install -o root -g root -m 0600 "$tls_work/server.key" "$TLS_DIR/server.key"
  root install -o root -g root -m 0644 "$tls_work/server.pem" "$TLS_DIR/server.pem"
}

root install -d -m 0755 "$TLS_DIR"
if ! tls_valid_ca ca; then
  log "tls: making the test CA $TLS_DIR/ca.pem"
  tls_make_ca ca "Kausal test CA"
  TLS_EVENTS+=("new CA")
fi
if ! tls_valid_ca other-ca; then
  log "tls: making the unrelated CA $TLS_DIR/other-ca.pem"
  tls_make_ca other-ca "Kausal other test CA (signs nothing)"
  TLS_EVENTS+=("new other-ca")
fi
if ! tls_valid_server; then
  log "tls: making $TLS_DIR/server.pem (DNS:localhost, signed by ca.pem)"
  tls_make_server
  tls_valid_server || die "tls: $TLS_DIR/server.pem is not valid right after making it (openssl verify -CAfile $TLS_CA)"
  TLS_EVENTS+=("new server cert")
fi
if [ -n "$tls_work" ]; then root rm -rf "$tls_work"; tls_work=""; fi
TLS_FP=$(openssl x509 -noout -fingerprint -sha256 -in "$TLS_DIR/server.pem") \
  || die "tls: cannot read $TLS_DIR/server.pem"

# Give a server its own copy of server.pem, server.key and ca.pem in $1, owned
# by $2:$3, key mode $4 (servers refuse a key they can't read or that is too
# open). Returns 0 when anything changed: the server must pick up the files.
tls_copy() {
  local dir=$1 owner=$2 group=$3 keymode=${4:-600} f mode changed=1 have
  have=$(root stat -c '%U:%G %a' "$dir" 2>/dev/null || true)
  # (a setgid bit inherited from the parent, as under /etc/redis, is fine)
  if [ "${have% *} ${have: -3}" != "$owner:$group 750" ]; then
    root install -d -o "$owner" -g "$group" -m 0750 "$dir"
  fi
  for f in server.pem server.key ca.pem; do
    mode=644; [ "$f" != server.key ] || mode=$keymode
    if ! root cmp -s "$TLS_DIR/$f" "$dir/$f" \
       || [ "$(root stat -c '%U:%G %a' "$dir/$f")" != "$owner:$group $mode" ]; then
      root install -o "$owner" -g "$group" -m "0$mode" "$TLS_DIR/$f" "$dir/$f"
      changed=0
    fi
  done
  return "$changed"
}

# Handshake with $1 (host:port; more s_client options may follow, e.g.
# -starttls postgres) as a client that trusts only ca.pem and wants the name
# localhost. Sets TLS_PROBE_FP to the served certificate's fingerprint (to tell
# a server still holding an old certificate), or TLS_PROBE_ERR and fails.
TLS_PROBE_FP="" TLS_PROBE_ERR=""
tls_probe() {
  local addr=$1 out; shift
  TLS_PROBE_FP="" TLS_PROBE_ERR=""
  if ! out=$(timeout 10 openssl s_client -connect "$addr" -servername localhost -verify_hostname localhost \
               -CAfile "$TLS_CA" -verify_return_error "$@" </dev/null 2>&1); then
    TLS_PROBE_ERR=$(printf '%s\n' "$out" | grep -Eim3 'error|errno|refused|unable|didn.t' | tr -s '\n ' ' ')
    TLS_PROBE_ERR=${TLS_PROBE_ERR:-openssl s_client failed}
    return 1
  fi
  TLS_PROBE_FP=$(printf '%s\n' "$out" | openssl x509 -noout -fingerprint -sha256 2>/dev/null) || true
}
# The server at $1.. answers TLS, verified by ca.pem for localhost, with the current server.pem.
tls_current() { tls_probe "$@" || return 1; [ "$TLS_PROBE_FP" = "$TLS_FP" ] || { TLS_PROBE_ERR="serves an old certificate"; return 1; }; }

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
PG_TLS=$PG_ETC/kausal-tls
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
max_wal_senders = $PG_WANT_SENDERS
# TLS on the same port, plaintext still allowed (certificates from $TLS_DIR).
ssl = on
ssl_cert_file = '$PG_TLS/server.pem'
ssl_key_file = '$PG_TLS/server.key'
ssl_ca_file = '$PG_TLS/ca.pem'"; then
  log "postgres: wrote $PG_ETC/conf.d/kausal.conf"
fi
PG_TLS_CHANGED=0
tls_copy "$PG_TLS" postgres postgres && PG_TLS_CHANGED=1

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
  PG_HBA_CHANGED=0 PG_TLS_CHANGED=0
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
fi

# TLS settings and files are read again on reload (SIGHUP), no restart needed.
pg_ssl_current() {
  pg_sql "SELECT string_agg(name || '=' || setting, ' ' ORDER BY name) FROM pg_settings
          WHERE name IN ('ssl','ssl_cert_file','ssl_key_file','ssl_ca_file')"
}
pg_ssl_wanted() { [ "$(pg_ssl_current)" = "$PG_SSL_WANT" ]; }
PG_SSL_WANT="ssl=on ssl_ca_file=$PG_TLS/ca.pem ssl_cert_file=$PG_TLS/server.pem ssl_key_file=$PG_TLS/server.key"
pg_ssl_have=$(pg_ssl_current) || die "postgres: cannot query ssl settings as the postgres user"
pg_reload_why=()
[ "$PG_HBA_CHANGED" = 0 ] || pg_reload_why+=("pg_hba.conf changed")
[ "$pg_ssl_have" = "$PG_SSL_WANT" ] || pg_reload_why+=("ssl settings '$pg_ssl_have'")
[ "$PG_TLS_CHANGED" = 0 ] || pg_reload_why+=("certificates in $PG_TLS changed")
if [ "${#pg_reload_why[@]}" = 0 ] && ! tls_current "127.0.0.1:$PG_PORT" -starttls postgres; then
  pg_reload_why+=("TLS on 127.0.0.1:$PG_PORT: $TLS_PROBE_ERR")
fi
if [ "${#pg_reload_why[@]}" -gt 0 ]; then
  log "postgres: reloading ($(join_reasons "${pg_reload_why[@]}"))"
  pg_ctl reload || die "postgres: pg_ctlcluster $PG_VER main reload failed"
  [ "$PG_STATE" != "unchanged" ] || PG_STATE="reloaded"
  wait_for 10 pg_ssl_wanted \
    || die "postgres: ssl settings '$(pg_ssl_current)' after reload, want '$PG_SSL_WANT' (see /var/log/postgresql/postgresql-$PG_VER-main.log)"
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
# TLS: verify-full against the test CA (name localhost), and the current certificate served.
pg_tls=$(psql -X -At "host=localhost port=$PG_PORT dbname=postgres user=postgres sslmode=verify-full sslrootcert=$TLS_CA" \
           -c 'SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()' -c 'SHOW ssl' 2>&1 | tr '\n' ' ') \
  || die "postgres: TLS connection to localhost:$PG_PORT (sslmode=verify-full, sslrootcert=$TLS_CA) fails: $pg_tls(see /var/log/postgresql/postgresql-$PG_VER-main.log)"
[ "$pg_tls" = "t on " ] || die "postgres: over sslmode=verify-full pg_stat_ssl.ssl/SHOW ssl say '$pg_tls', want 't on' (see /var/log/postgresql/postgresql-$PG_VER-main.log)"
tls_current "127.0.0.1:$PG_PORT" -starttls postgres \
  || die "postgres: TLS on 127.0.0.1:$PG_PORT: $TLS_PROBE_ERR (see /var/log/postgresql/postgresql-$PG_VER-main.log)"
PG_LINE="postgres: ready ($PG_VER/main on 127.0.0.1:$PG_PORT, wal_level=$wl, max_replication_slots=$PG_WANT_SLOTS, ssl=on) [$PG_STATE]"

# =================================================================== MariaDB
MY_STATE="unchanged"
MY_CNF_DIR=/etc/mysql/mariadb.conf.d
MY_CNF=$MY_CNF_DIR/60-kausal.cnf
MY_DATADIR=/var/lib/mysql
MY_TLS=/etc/mysql/kausal-tls

if write_if_changed "$MY_CNF" "# Written by kausal scripts/setup.sh: binlog for CDC.
[mariadbd]
server_id           = 1
log_bin             = mariadb-bin
binlog_format       = ROW
binlog_row_image    = FULL
binlog_row_metadata = FULL
gtid_strict_mode    = ON
log_slave_updates   = ON
expire_logs_days    = 2
# TLS on the same port, plaintext still allowed (certificates from $TLS_DIR).
ssl_cert            = $MY_TLS/server.pem
ssl_key             = $MY_TLS/server.key
ssl_ca              = $MY_TLS/ca.pem"; then
  log "mariadb: wrote $MY_CNF"
fi
MY_TLS_CHANGED=0
tls_copy "$MY_TLS" mysql mysql && MY_TLS_CHANGED=1

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
    MY_TLS_CHANGED=0
  fi
fi

MY_CHECK="SELECT CONCAT_WS(' ', @@log_bin+0, @@binlog_format, @@binlog_row_image, @@binlog_row_metadata,
                  @@gtid_strict_mode+0, @@log_slave_updates+0, @@server_id, ROUND(@@expire_logs_days),
                  @@have_ssl, @@ssl_cert, @@ssl_key, @@ssl_ca)"
MY_WANT="1 ROW FULL FULL 1 1 1 2 YES $MY_TLS/server.pem $MY_TLS/server.key $MY_TLS/ca.pem"
my_have=$(my_sql "$MY_CHECK") || die "mariadb: cannot query settings"
if [ "$my_have" != "$MY_WANT" ]; then
  log "mariadb: restarting (log_bin,format,row_image,row_metadata,gtid_strict,log_slave_updates,server_id,expire_days,have_ssl,ssl_cert,ssl_key,ssl_ca: '$my_have' -> '$MY_WANT')"
  my_stop
  my_start
  MY_STATE="restarted"
  MY_TLS_CHANGED=0
  my_have=$(my_sql "$MY_CHECK")
  [ "$my_have" = "$MY_WANT" ] || die "mariadb: settings still '$my_have' after restart, want '$MY_WANT' (see /var/log/mysql/error.log)"
fi
# Same paths, new certificates: FLUSH SSL (MariaDB 10.4+) reads them again without a restart.
my_tls_current() { tls_current 127.0.0.1:3306 -starttls mysql; }
if [ "$MY_TLS_CHANGED" = 1 ] || ! my_tls_current; then
  log "mariadb: reloading certificates (FLUSH SSL)"
  my_sql 'FLUSH SSL' || die "mariadb: FLUSH SSL failed (see /var/log/mysql/error.log)"
  [ "$MY_STATE" != "unchanged" ] || MY_STATE="reloaded"
fi
my_tls_current || die "mariadb: TLS on 127.0.0.1:3306: $TLS_PROBE_ERR (see /var/log/mysql/error.log)"

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
my_tls=$(mariadb --batch --skip-column-names --protocol=TCP -h localhost -P 3306 -u kausal -pkausal \
           --ssl --ssl-ca="$TLS_CA" --ssl-verify-server-cert -e "SHOW STATUS LIKE 'Ssl_version'" 2>&1) \
  || die "mariadb: kausal/kausal cannot log in over TLS to localhost:3306 (--ssl-verify-server-cert, --ssl-ca=$TLS_CA): $my_tls (see /var/log/mysql/error.log)"
case $my_tls in
  *TLSv1.[23]*) ;;
  *) die "mariadb: a TLS login to localhost:3306 reports Ssl_version '$my_tls', want TLSv1.2 or TLSv1.3 (see /var/log/mysql/error.log)" ;;
esac
MY_VER=$(my_sql 'SELECT VERSION()')
MY_LINE="mariadb: ready (${MY_VER%%-*} on 127.0.0.1:3306, log_bin=ON binlog_format=ROW row_image=FULL row_metadata=FULL, user kausal/kausal, have_ssl=YES) [$MY_STATE]"

# ================================================================== RabbitMQ
RMQ_STATE="unchanged"
RMQ_CONF=/etc/rabbitmq/rabbitmq.conf
RMQ_TLS=/etc/rabbitmq/kausal-tls
RMQ_TLS_CHANGED=0
tls_copy "$RMQ_TLS" rabbitmq rabbitmq && RMQ_TLS_CHANGED=1
# Our lines live in a marked block; the rest of rabbitmq.conf (the machine's
# listeners.tcp.local = 127.0.0.1:5672, say) is kept as it is.
RMQ_BLOCK="# BEGIN kausal tls (written by scripts/setup.sh; lines outside this block are kept)
listeners.ssl.default = 127.0.0.1:5671
ssl_options.cacertfile = $RMQ_TLS/ca.pem
ssl_options.certfile = $RMQ_TLS/server.pem
ssl_options.keyfile = $RMQ_TLS/server.key
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
ssl_options.versions.1 = tlsv1.3
ssl_options.versions.2 = tlsv1.2
# END kausal tls"
rmq_rest=$(root cat "$RMQ_CONF" 2>/dev/null | awk '/^# BEGIN kausal tls/ {skip = 1} !skip {print} /^# END kausal tls/ {skip = 0}' || true)
RMQ_CONF_CHANGED=0
if write_if_changed "$RMQ_CONF" "${rmq_rest:+$rmq_rest
}$RMQ_BLOCK"; then
  log "rabbitmq: wrote the kausal tls block in $RMQ_CONF"
  RMQ_CONF_CHANGED=1
fi

rmq_up() { root timeout 10 rabbitmqctl -q await_startup; }
rmq_start() {
  root rabbitmq-server -detached >/dev/null 2>&1 || die "rabbitmq: 'rabbitmq-server -detached' failed"
  wait_for 90 rmq_up || die "rabbitmq: not started after 90 s (rabbitmqctl await_startup; see /var/log/rabbitmq/)"
}
rmq_tls_current() { tls_current 127.0.0.1:5671; }
if ! root timeout 5 rabbitmqctl -q await_startup >/dev/null 2>&1; then
  log "rabbitmq: starting (rabbitmq-server -detached)"
  rmq_start
  RMQ_STATE="started"
else
  # RabbitMQ reads rabbitmq.conf and the certificates only when it starts.
  rmq_restart_why=()
  [ "$RMQ_CONF_CHANGED" = 0 ] || rmq_restart_why+=("$RMQ_CONF changed")
  [ "$RMQ_TLS_CHANGED" = 0 ] || rmq_restart_why+=("certificates in $RMQ_TLS changed")
  if [ "${#rmq_restart_why[@]}" = 0 ] && ! rmq_tls_current; then
    rmq_restart_why+=("TLS on 127.0.0.1:5671: $TLS_PROBE_ERR")
  fi
  if [ "${#rmq_restart_why[@]}" -gt 0 ]; then
    log "rabbitmq: restarting ($(join_reasons "${rmq_restart_why[@]}"))"
    root rabbitmqctl -q shutdown >/dev/null || die "rabbitmq: 'rabbitmqctl shutdown' failed (see /var/log/rabbitmq/)"
    rmq_start
    RMQ_STATE="restarted"
  fi
fi
wait_for 10 rmq_tls_current \
  || die "rabbitmq: TLS on 127.0.0.1:5671: $TLS_PROBE_ERR (see /var/log/rabbitmq/)"
(exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null \
  || die "rabbitmq: nothing listens on 127.0.0.1:5672 (plaintext AMQP; see /var/log/rabbitmq/rabbit@localhost.log)"
RMQ_VER=$(root rabbitmqctl -q version 2>/dev/null || echo '?')
RMQ_LINE="rabbitmq: ready ($RMQ_VER on 127.0.0.1:5672, amqps 127.0.0.1:5671, guest/guest) [$RMQ_STATE]"

# ===================================================================== Redis
REDIS_STATE="unchanged"
REDIS_TLS=/etc/redis/kausal-tls
REDIS_TLS_CHANGED=0
# Redis runs as root here; group redis lets a server running as redis read the key too.
redis_group=root
getent group redis >/dev/null 2>&1 && redis_group=redis
tls_copy "$REDIS_TLS" root "$redis_group" 640 && REDIS_TLS_CHANGED=1
# TLS on 6380 next to plaintext 6379 (same bind addresses), no client certificates.
REDIS_TLS_OPTS=(tls-port 6380 tls-cert-file "$REDIS_TLS/server.pem" tls-key-file "$REDIS_TLS/server.key"
                tls-ca-cert-file "$REDIS_TLS/ca.pem" tls-auth-clients no)
redis_cli() { redis-cli -h 127.0.0.1 -p 6379 "$@"; }
redis_up() { [ "$(redis_cli ping 2>/dev/null)" = "PONG" ]; }
redis_tls_names=() redis_tls_args=()
for ((i = 0; i < ${#REDIS_TLS_OPTS[@]}; i += 2)); do
  redis_tls_names+=("${REDIS_TLS_OPTS[i]}")
  redis_tls_args+=("--${REDIS_TLS_OPTS[i]}" "${REDIS_TLS_OPTS[i + 1]}")
done
redis_start() {
  root install -d /var/lib/redis /var/log/redis
  root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log "${redis_tls_args[@]}" >/dev/null \
    || die "redis: redis-server failed to start (see /var/log/redis/ci.log)"
  wait_for 20 redis_up || die "redis: no PONG on 127.0.0.1:6379 after 20 s (see /var/log/redis/ci.log)"
}
if ! redis_up; then
  log "redis: starting"
  redis_start
  REDIS_STATE="started"
fi
# name=value pairs, sorted, for the TLS options (CONFIG GET answers in its own order).
redis_tls_have() { redis_cli config get "${redis_tls_names[@]}" | paste -d= - - | sort | tr '\n' ' '; }
REDIS_TLS_WANT=$(printf '%s=%s\n' "${REDIS_TLS_OPTS[@]}" | sort | tr '\n' ' ')
redis_tls_current() { tls_current 127.0.0.1:6380; }
redis_have=$(redis_tls_have) || die "redis: CONFIG GET failed on 127.0.0.1:6379"
if [ "$redis_have" != "$REDIS_TLS_WANT" ] || [ "$REDIS_TLS_CHANGED" = 1 ] || ! redis_tls_current; then
  # Redis 7 takes TLS settings at runtime, and setting them reloads the files: no restart.
  log "redis: CONFIG SET of the TLS options (had: $redis_have)"
  if ! redis_out=$(redis_cli config set "${REDIS_TLS_OPTS[@]}" 2>&1) || [ "$redis_out" != "OK" ] \
     || ! wait_for 5 redis_tls_current; then
    log "redis: CONFIG SET did not bring up TLS on 6380 (${redis_out:-?}; ${TLS_PROBE_ERR:-}), restarting with the options"
    redis_cli shutdown nosave >/dev/null 2>&1 || true
    wait_for 20 sh -c '! redis-cli -h 127.0.0.1 -p 6379 ping' || die "redis: still answering on 127.0.0.1:6379 after SHUTDOWN NOSAVE"
    redis_start
    REDIS_STATE="restarted"
  else
    [ "$REDIS_STATE" != "unchanged" ] || REDIS_STATE="reconfigured"
  fi
fi
redis_tls_current || die "redis: TLS on 127.0.0.1:6380: $TLS_PROBE_ERR (see /var/log/redis/ci.log)"
redis_pong=$(redis-cli --tls --cacert "$TLS_CA" -h localhost -p 6380 ping 2>&1) || true
[ "$redis_pong" = "PONG" ] \
  || die "redis: 'redis-cli --tls --cacert $TLS_CA -h localhost -p 6380 ping' says '$redis_pong', want PONG (see /var/log/redis/ci.log)"
REDIS_VER=$(redis-cli -h 127.0.0.1 -p 6379 info server 2>/dev/null | tr -d '\r' | awk -F: '$1=="redis_version"{print $2}')
REDIS_LINE="redis: ready (${REDIS_VER:-?} on 127.0.0.1:6379, rediss 127.0.0.1:6380) [$REDIS_STATE]"

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

  # nx-27017 has no TLS: stunnel (a daemon of its own, not a systemd unit)
  # takes TLS on 27018 and forwards to 27017.
  ST_CONF=/etc/kausal/stunnel-mongo.conf
  ST_PIDFILE=/run/kausal-stunnel-mongo.pid
  ST_LOG=/var/log/kausal-stunnel-mongo.log
  ST_CONF_CHANGED=0
  if write_if_changed "$ST_CONF" "; Written by kausal scripts/setup.sh: TLS in front of nx-27017 (MongoDB wire, no TLS of its own).
pid = $ST_PIDFILE
foreground = no
output = $ST_LOG
debug = warning

[mongo-tls]
accept = 127.0.0.1:27018
connect = 127.0.0.1:27017
cert = $TLS_DIR/server.pem
key = $TLS_DIR/server.key
sslVersionMin = TLSv1.2"; then
    log "stunnel: wrote $ST_CONF"
    ST_CONF_CHANGED=1
  fi
  # The pid of our stunnel (from its pid file), if it runs.
  st_pid() {
    local pid
    pid=$(root cat "$ST_PIDFILE" 2>/dev/null) || return 1
    [ -n "$pid" ] && root kill -0 "$pid" 2>/dev/null && grep -q '^stunnel' "/proc/$pid/comm" 2>/dev/null && echo "$pid"
  }
  st_listening() { (exec 3<>/dev/tcp/127.0.0.1/27018) 2>/dev/null; }
  st_tls_current() { tls_current 127.0.0.1:27018; }
  st_running=$(st_pid || true)
  if [ -n "$st_running" ]; then
    st_restart_why=()
    [ "$ST_CONF_CHANGED" = 0 ] || st_restart_why+=("$ST_CONF changed")
    if [ "${#st_restart_why[@]}" = 0 ] && ! st_tls_current; then
      st_restart_why+=("TLS on 127.0.0.1:27018: $TLS_PROBE_ERR")
    fi
    if [ "${#st_restart_why[@]}" -gt 0 ]; then
      log "stunnel: stopping pid $st_running to restart it ($(join_reasons "${st_restart_why[@]}"))"
      root kill "$st_running" || die "stunnel: cannot stop pid $st_running"
      st_gone() { ! root kill -0 "$st_running" 2>/dev/null; }
      wait_for 10 st_gone || die "stunnel: pid $st_running still running 10 s after SIGTERM"
      TLS_EVENTS+=("stunnel restarted")
    fi
  fi
  if ! st_listening; then
    log "stunnel: starting (TLS on 127.0.0.1:27018 -> nx-27017 on 127.0.0.1:27017)"
    root stunnel4 "$ST_CONF" >/dev/null 2>&1 || die "stunnel: 'stunnel4 $ST_CONF' failed (see $ST_LOG)"
    wait_for 10 st_listening || die "stunnel: not listening on 127.0.0.1:27018 after 10 s (see $ST_LOG)"
    [ -n "$st_running" ] || TLS_EVENTS+=("stunnel started")
  elif [ -z "$(st_pid || true)" ]; then
    die "stunnel: 127.0.0.1:27018 is taken by something other than our stunnel ($ST_PIDFILE); free the port"
  fi
  st_tls_current || die "stunnel: TLS on 127.0.0.1:27018 (in front of nx-27017): $TLS_PROBE_ERR (see $ST_LOG)"
fi

# =================================================================== summary
TLS_MONGO="mongo+tls 27018"
[ "${KAUSAL_SETUP_MONGO:-1}" != "0" ] || TLS_MONGO="mongo+tls skipped (KAUSAL_SETUP_MONGO=0)"
TLS_STATE="unchanged"
if [ "${#TLS_EVENTS[@]}" -gt 0 ]; then TLS_STATE=$(printf '%s, ' "${TLS_EVENTS[@]}"); TLS_STATE=${TLS_STATE%, }; fi
TLS_LINE="tls: ready (CA $TLS_CA; postgres $PG_PORT ssl=on, mariadb 3306 have_ssl=YES, amqps 5671, rediss 6380, $TLS_MONGO) [$TLS_STATE]"
printf '%s\n' "$PG_LINE" "$MY_LINE" "$RMQ_LINE" "$REDIS_LINE" "$NX_LINE" "$TLS_LINE"
awk -v s="$START_TS" -v e="$(date +%s.%N)" 'BEGIN { printf "setup: done in %.1f s\n", e - s }'
