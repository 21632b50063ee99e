#!/usr/bin/env bash
# Install and start the dashboard behind nginx on a Debian 12 / Ubuntu 24.04 host (Python 3.11-3.12). Re-runnable.
#
#   HAR_REPO_URL=https://git.example.com/you/har-vit.git HAR_REGISTRY=s3://my-bucket/models \
#     HAR_DOMAIN=har.example.com HAR_CERT_EMAIL=ops@example.com HAR_BASIC_AUTH_USER=team bash deploy/bootstrap.sh
#
# Steps: apt packages -> service user -> code (git clone/update, or code already in HAR_APP_DIR) -> venv with the
# serving install only (pip install -e ., no torch) -> pull the model from the registry (verified, cached) and point
# HAR_STATE_DIR/current-model at it -> env file -> nginx (TLS, optional basic auth, limits) -> systemd unit -> start.
# `--model-only` does the pull and the link alone: new page loads get the new version, open pages keep theirs.
#
# A re-run keeps every setting of the earlier runs: each variable below that a run is given (non-empty) is written to
# HAR_ENV_FILE, and a later run takes from there every one it is not given again. Give a variable to change it; delete
# its line from HAR_ENV_FILE to return it to its default. Never written there: HAR_BASIC_AUTH_PASSWORD, HAR_PIP_ARGS
# and the HAR_SKIP_* / HAR_BOOTSTRAP_* switches, which count for one run only.
# Turning protection off takes a flag (an empty or missing variable never does it):
#   --no-login          drop the basic-auth login: the site becomes public
#   --self-signed       drop the Let's Encrypt certificate (and HSTS) for a self-signed one
#   --no-proxy          stop serving through nginx (no TLS, no login; set HAR_BIND yourself)
# Variables (defaults in brackets):
#   HAR_REGISTRY        registry URL, s3://bucket/prefix or a folder (required on the first run)
#   HAR_MODEL_NAME      [har-vit]      HAR_MODEL_VERSION [latest]  (a version name pins it, e.g. to roll back)
#   HAR_REPO_URL        git URL to clone into HAR_APP_DIR (unset: HAR_APP_DIR must already hold the code); kept
#                       without any user:password@ part
#   HAR_REPO_REF        [main]         branch, tag or commit to check out
#   HAR_APP_DIR         [/opt/har-vit] HAR_USER [har]  HAR_STATE_DIR [/var/lib/har-vit]
#   HAR_ENV_FILE        [/etc/har-dashboard.env]        HAR_UNIT_DIR [/etc/systemd/system]
#   HAR_PORT            [8866]         HAR_BIND [127.0.0.1]  (Voila; only nginx faces the network)
#   HAR_PARAMS_FILE, HAR_MAX_KERNELS, HAR_KERNEL_IDLE_SECONDS, HAR_CONNECT_GRACE_SECONDS, HAR_IDLE_EVICT_SECONDS,
#   HAR_UNCONNECTED_SECONDS, HAR_ADMISSION_WAIT_SECONDS, HAR_CULL_INTERVAL_SECONDS, HAR_MAX_UPLOAD_MIB, HAR_MAX_PIXELS,
#   HAR_TOP_K, HAR_THREADS  the dashboard's settings (lib/dashboard; unset: its defaults)
#   HAR_PROXY           [nginx]        none: no proxy (then set HAR_BIND yourself); from nginx to none takes --no-proxy
#   HAR_DOMAIN          the site's DNS name; with HAR_CERT_EMAIL: a Let's Encrypt certificate (certbot), else a
#                       self-signed one.  HAR_NGINX_DIR [/etc/nginx]  HAR_TLS_DIR [HAR_NGINX_DIR/har-dashboard]
#   HAR_LETSENCRYPT_DIR [/etc/letsencrypt]  certbot's configuration folder (its live/DOMAIN holds the certificate)
#   HAR_BASIC_AUTH_USER login for the site (unset on the first run: no login); HAR_BASIC_AUTH_PASSWORD, else one is
#                       generated into HAR_TLS_DIR/basic-auth-password (root only). A re-run keeps the password.
#   HAR_PROXY_ADDR, HAR_HTTPS_PORT, HAR_HTTP_PORT, HAR_PROXY_PAGE_RATE, HAR_PROXY_PAGE_BURST, HAR_PROXY_MAX_SOCKETS,
#   HAR_PROXY_MAX_CONNS, HAR_PROXY_TRUSTED_CIDR  listen address, ports and proxy limits: see deploy/nginx/render.sh
#   HAR_ACME_ROOT       [/var/www/har-acme]  webroot of certbot's HTTP-01 challenge
#   HAR_PYTHON          [python3]      HAR_PIP_ARGS (extra pip arguments)
#   HAR_SKIP_APT=1      skip apt-get   HAR_SKIP_PIP=1 skip venv creation and pip
#   HAR_BOOTSTRAP_NO_SYSTEMD=1 (or --no-systemd): no unit install, no nginx reload; exec Voila in the foreground
#   HAR_BOOTSTRAP_NO_START=1   (or --no-start): do every step but start nothing
set -euo pipefail

log() { echo "[bootstrap] $*" >&2; }

MODEL_ONLY=0 NO_LOGIN=0 SELF_SIGNED=0 NO_PROXY=0
for arg in "$@"; do
  case "$arg" in
    --no-systemd) HAR_BOOTSTRAP_NO_SYSTEMD=1 ;;
    --no-start) HAR_BOOTSTRAP_NO_START=1 ;;
    --model-only) MODEL_ONLY=1 ;;
    --no-login) NO_LOGIN=1 ;;
    --self-signed) SELF_SIGNED=1 ;;
    --no-proxy) NO_PROXY=1 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) log "unknown argument $arg (see --help)"; exit 2 ;;
  esac
done

HAR_ENV_FILE=${HAR_ENV_FILE:-/etc/har-dashboard.env}
# The settings a re-run takes from HAR_ENV_FILE when it is not given them. Secrets are never among them.
KEPT_SETTINGS=(HAR_REGISTRY HAR_MODEL_NAME HAR_MODEL_VERSION HAR_REPO_URL HAR_REPO_REF HAR_APP_DIR HAR_USER
  HAR_STATE_DIR HAR_UNIT_DIR HAR_PORT HAR_BIND HAR_PYTHON HAR_PROXY HAR_DOMAIN HAR_CERT_EMAIL HAR_NGINX_DIR HAR_TLS_DIR
  HAR_LETSENCRYPT_DIR HAR_ACME_ROOT HAR_BASIC_AUTH_USER)
# deploy/nginx/render.sh's listen address, ports and limits.
PROXY_SETTINGS=(HAR_PROXY_ADDR HAR_HTTPS_PORT HAR_HTTP_PORT HAR_PROXY_PAGE_RATE HAR_PROXY_PAGE_BURST
  HAR_PROXY_MAX_SOCKETS HAR_PROXY_MAX_CONNS HAR_PROXY_TRUSTED_CIDR)
# The dashboard's own settings (lib/dashboard); unset: its defaults apply (params/demo.yaml).
OPTIONAL_SETTINGS=(HAR_PARAMS_FILE HAR_MAX_KERNELS HAR_KERNEL_IDLE_SECONDS HAR_MAX_UPLOAD_MIB HAR_MAX_PIXELS HAR_TOP_K
  HAR_THREADS HAR_CONNECT_GRACE_SECONDS HAR_IDLE_EVICT_SECONDS HAR_UNCONNECTED_SECONDS HAR_ADMISSION_WAIT_SECONDS
  HAR_CULL_INTERVAL_SECONDS)
ALL_SETTINGS=("${KEPT_SETTINGS[@]}" "${PROXY_SETTINGS[@]}" "${OPTIONAL_SETTINGS[@]}")

# The value an earlier run wrote for a setting (empty when it wrote none).
previous() { if [ -r "$HAR_ENV_FILE" ]; then sed -n "s/^$1=//p" "$HAR_ENV_FILE" | tail -n 1; fi; }

PREVIOUS_PROXY=$(previous HAR_PROXY)
kept=()
for name in "${ALL_SETTINGS[@]}"; do
  if [ -z "${!name:-}" ]; then
    value=$(previous "$name")
    if [ -n "$value" ]; then
      printf -v "$name" '%s' "$value"
      kept+=("$name")
    fi
  fi
done
if [ "${#kept[@]}" -gt 0 ]; then log "kept from $HAR_ENV_FILE: ${kept[*]}"; fi

: "${HAR_REGISTRY:?set HAR_REGISTRY to s3://bucket/prefix (or a registry folder)}"
HAR_MODEL_NAME=${HAR_MODEL_NAME:-har-vit}
HAR_MODEL_VERSION=${HAR_MODEL_VERSION:-latest}
# A clone uses the URL as given; credentials in it stay in the clone's .git/config, never in the env file or this log.
CLONE_URL=${HAR_REPO_URL:-}
HAR_REPO_URL=$(printf '%s' "$CLONE_URL" | sed -E 's#^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@#\1#')
HAR_REPO_REF=${HAR_REPO_REF:-main}
HAR_APP_DIR=${HAR_APP_DIR:-/opt/har-vit}
HAR_USER=${HAR_USER:-har}
HAR_STATE_DIR=${HAR_STATE_DIR:-/var/lib/har-vit}
HAR_UNIT_DIR=${HAR_UNIT_DIR:-/etc/systemd/system}
HAR_PORT=${HAR_PORT:-8866}
HAR_BIND=${HAR_BIND:-127.0.0.1}
HAR_PROXY=${HAR_PROXY:-nginx}
HAR_DOMAIN=${HAR_DOMAIN:-}
HAR_CERT_EMAIL=${HAR_CERT_EMAIL:-}
HAR_NGINX_DIR=${HAR_NGINX_DIR:-/etc/nginx}
HAR_TLS_DIR=${HAR_TLS_DIR:-$HAR_NGINX_DIR/har-dashboard}
HAR_LETSENCRYPT_DIR=${HAR_LETSENCRYPT_DIR:-/etc/letsencrypt}
HAR_ACME_ROOT=${HAR_ACME_ROOT:-/var/www/har-acme}
HAR_BASIC_AUTH_USER=${HAR_BASIC_AUTH_USER:-}
HAR_BASIC_AUTH_PASSWORD=${HAR_BASIC_AUTH_PASSWORD:-}
HAR_PYTHON=${HAR_PYTHON:-python3}
HAR_PIP_ARGS=${HAR_PIP_ARGS:-}
HAR_SKIP_APT=${HAR_SKIP_APT:-0}
HAR_SKIP_PIP=${HAR_SKIP_PIP:-0}
HAR_BOOTSTRAP_NO_SYSTEMD=${HAR_BOOTSTRAP_NO_SYSTEMD:-0}
HAR_BOOTSTRAP_NO_START=${HAR_BOOTSTRAP_NO_START:-0}
SERVICE=har-dashboard
CACHE_DIR="$HAR_STATE_DIR/registry-cache"
# HAR_MODEL_DIR names this link, never a version folder: moving it rolls the model without a restart.
CURRENT_MODEL="$HAR_STATE_DIR/current-model"
VENV="$HAR_APP_DIR/.venv"
SITE="$HAR_NGINX_DIR/conf.d/$SERVICE.conf"
NGINX_GROUP=www-data  # Debian's nginx workers: they read the basic-auth file

if [ "$MODEL_ONLY" = 1 ] && [ $((NO_LOGIN + SELF_SIGNED + NO_PROXY)) -gt 0 ]; then
  log "--model-only leaves the proxy as it is: --no-login, --self-signed and --no-proxy need a full run"
  exit 2
fi
# What protects the site now (its nginx configuration as the last run wrote it).
SITE_LOGIN=0 SITE_HSTS=0
if [ -f "$SITE" ]; then
  if grep -q 'auth_basic_user_file ' "$SITE"; then SITE_LOGIN=1; fi
  if grep -q 'Strict-Transport-Security' "$SITE"; then SITE_HSTS=1; fi
fi
# Protection goes off only by a flag; the flag says what it does.
if [ "$NO_LOGIN" = 1 ]; then
  HAR_BASIC_AUTH_USER=""
  log "--no-login: the login is turned OFF; anyone who reaches the site sees the dashboard"
fi
if [ "$SELF_SIGNED" = 1 ]; then
  HAR_CERT_EMAIL=""
  log "--self-signed: no Let's Encrypt certificate and no HSTS; browsers that kept this site's HSTS header (for a" \
    "year) refuse the self-signed certificate until it expires"
fi
if [ "$NO_PROXY" = 1 ]; then
  HAR_PROXY=none
  log "--no-proxy: nginx is turned OFF for this site: no TLS, no login, no limits in front of Voila"
fi
case "$HAR_PROXY" in nginx|none) ;; *) log "HAR_PROXY must be nginx or none, not '$HAR_PROXY'"; exit 2 ;; esac
if [ -n "$HAR_CERT_EMAIL" ] && [ -z "$HAR_DOMAIN" ]; then log "HAR_CERT_EMAIL needs HAR_DOMAIN"; exit 2; fi

# The site as it is now is the last word on what protects it: an env file written before settings were kept, or one
# edited by hand, must not switch a login, a trusted certificate or the proxy off without the flag.
refuse_to_weaken() {
  log "$*"
  log "nothing was changed"
  exit 2
}
if [ "$MODEL_ONLY" = 1 ]; then
  :  # touches neither nginx nor its site
elif [ "$HAR_PROXY" = none ] && [ "$NO_PROXY" = 0 ] && { [ "$PREVIOUS_PROXY" = nginx ] || [ -f "$SITE" ]; }; then
  refuse_to_weaken "HAR_PROXY=none would leave this site without TLS and login: pass --no-proxy to mean it"
elif [ "$HAR_PROXY" = nginx ] && [ -f "$SITE" ]; then
  if [ -z "$HAR_BASIC_AUTH_USER" ] && [ "$NO_LOGIN" = 0 ] && [ "$SITE_LOGIN" = 1 ]; then
    refuse_to_weaken "the site asks for a login, but HAR_BASIC_AUTH_USER is neither given nor kept in $HAR_ENV_FILE:" \
      "give HAR_BASIC_AUTH_USER=<user> (its password is kept), or pass --no-login to make the site public"
  fi
  if [ -z "$HAR_CERT_EMAIL" ] && [ "$SELF_SIGNED" = 0 ] && [ "$SITE_HSTS" = 1 ]; then
    refuse_to_weaken "the site has a Let's Encrypt certificate and HSTS, but HAR_CERT_EMAIL is neither given nor" \
      "kept in $HAR_ENV_FILE: give HAR_DOMAIN and HAR_CERT_EMAIL, or pass --self-signed to fall back to a" \
      "self-signed certificate"
  fi
fi

# The dashboard (render_site's upload cap) and render.sh read the settings from the environment.
for name in "${ALL_SETTINGS[@]}"; do
  case "${!name:-}" in *$'\n'*) log "$name holds a line break"; exit 2 ;; esac  # one line each in the env file
  if [ -n "${!name:-}" ]; then export "${name?}"; fi
done

# Run a command as the service user (directly when we already are that user).
as_user() {
  if [ "$(id -un)" = "$HAR_USER" ]; then "$@"; else runuser -u "$HAR_USER" -- "$@"; fi
}

install_packages() {
  if [ "$HAR_SKIP_APT" = 1 ]; then log "skipping apt (HAR_SKIP_APT=1)"; return; fi
  log "installing apt packages"
  export DEBIAN_FRONTEND=noninteractive
  local packages=(python3 python3-venv python3-pip git ca-certificates)
  if [ "$HAR_PROXY" = nginx ]; then packages+=(nginx openssl); fi
  if [ -n "$HAR_CERT_EMAIL" ]; then packages+=(certbot); fi
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${packages[@]}"
}

create_user() {
  if id -u "$HAR_USER" >/dev/null 2>&1; then return; fi
  log "creating system user $HAR_USER"
  useradd --system --user-group --home-dir "$HAR_STATE_DIR" --no-create-home --shell /usr/sbin/nologin "$HAR_USER"
}

fetch_code() {
  if [ -n "$HAR_REPO_URL" ]; then
    if [ -d "$HAR_APP_DIR/.git" ]; then
      log "updating $HAR_APP_DIR to $HAR_REPO_REF"
      git -C "$HAR_APP_DIR" fetch --quiet origin "$HAR_REPO_REF"
      git -C "$HAR_APP_DIR" checkout --quiet --force FETCH_HEAD
    else
      log "cloning $HAR_REPO_URL into $HAR_APP_DIR"
      git clone --quiet "$CLONE_URL" "$HAR_APP_DIR"
      git -C "$HAR_APP_DIR" checkout --quiet "$HAR_REPO_REF"
    fi
  fi
  if [ ! -f "$HAR_APP_DIR/pyproject.toml" ] || [ ! -f "$HAR_APP_DIR/notebooks/dashboard.ipynb" ]; then
    log "no project in $HAR_APP_DIR: set HAR_REPO_URL or copy the code there first"
    exit 1
  fi
}

install_python() {
  if [ "$HAR_SKIP_PIP" = 1 ]; then log "skipping venv and pip (HAR_SKIP_PIP=1)"; return; fi
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$HAR_PYTHON" -m venv "$VENV"
  fi
  # The base install only: what serving imports (Voila, ipywidgets, ONNX Runtime, boto3, Pillow + HEIC), no torch,
  # no transformers. Research adds the `research` extra (make setup).
  log "pip install -e $HAR_APP_DIR (serving set)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # shellcheck disable=SC2086  # HAR_PIP_ARGS is a list of words on purpose
  "$VENV/bin/python" -m pip install --quiet $HAR_PIP_ARGS -e "$HAR_APP_DIR"
  # The dashboard notebook names the project kernel; without it Voila warns and falls back on every page load.
  "$VENV/bin/python" -m ipykernel install --sys-prefix --name har-vit --display-name "HAR-ViT (.venv)" >/dev/null
}

prepare_state() {
  mkdir -p "$HAR_STATE_DIR" "$CACHE_DIR" "$(dirname "$HAR_ENV_FILE")"
  if [ "$(id -u)" = 0 ] && [ "$HAR_USER" != root ]; then
    chown -R "$HAR_USER:" "$HAR_STATE_DIR"
    chmod 0750 "$HAR_STATE_DIR"
  fi
}

pull_model() {
  log "pulling $HAR_MODEL_NAME:$HAR_MODEL_VERSION from $HAR_REGISTRY"
  if [ "$HAR_MODEL_VERSION" != latest ]; then
    log "HAR_MODEL_VERSION=$HAR_MODEL_VERSION pins this version for later runs too; HAR_MODEL_VERSION=latest unpins it"
  fi
  MODEL_DIR=$(cd "$HAR_APP_DIR" && as_user env HOME="$HAR_STATE_DIR" "$VENV/bin/python" -m lib.registry pull "$HAR_REGISTRY" \
    --model "$HAR_MODEL_NAME" --version "$HAR_MODEL_VERSION" --cache-dir "$CACHE_DIR" | tail -n 1)
  if [ ! -d "$MODEL_DIR/model" ]; then
    log "pull did not produce a model folder (got '$MODEL_DIR')"
    exit 1
  fi
  # Replace the link in one rename: a kernel starting now sees either the old version or the new one, never none.
  ln -sfn "$MODEL_DIR" "$CURRENT_MODEL.new"
  mv -fT "$CURRENT_MODEL.new" "$CURRENT_MODEL"
  log "model ready in $MODEL_DIR ($CURRENT_MODEL points there)"
}

write_env() {
  local tmp
  tmp=$(mktemp "$HAR_ENV_FILE.XXXXXX")
  cat >"$tmp" <<ENV
# Written by deploy/bootstrap.sh; HAR_* variables override params/demo.yaml's dashboard section.
# HAR_MODEL_DIR is a link to the pulled version: \`bootstrap.sh --model-only\` moves it (no restart needed).
HAR_REGISTRY=$HAR_REGISTRY
HAR_MODEL_NAME=$HAR_MODEL_NAME
HAR_MODEL_DIR=$CURRENT_MODEL
HAR_REGISTRY_CACHE=$CACHE_DIR
HAR_PORT=$HAR_PORT
HAR_BIND=$HAR_BIND
ENV
  local name
  for name in "${OPTIONAL_SETTINGS[@]}"; do
    if [ -n "${!name:-}" ]; then echo "$name=${!name}" >>"$tmp"; fi
  done
  echo "# deploy/bootstrap.sh's own settings: a re-run takes from here each one it is not given." >>"$tmp"
  for name in "${KEPT_SETTINGS[@]}" "${PROXY_SETTINGS[@]}"; do
    case "$name" in HAR_REGISTRY|HAR_MODEL_NAME|HAR_PORT|HAR_BIND) continue ;; esac  # written above
    if [ -n "${!name:-}" ]; then echo "$name=${!name}" >>"$tmp"; fi
  done
  if [ "$(id -u)" = 0 ] && [ "$HAR_USER" != root ]; then chgrp "$(id -gn "$HAR_USER")" "$tmp"; fi
  chmod 0640 "$tmp"
  mv -f "$tmp" "$HAR_ENV_FILE"
  log "wrote $HAR_ENV_FILE"
}

# A self-signed certificate for HAR_DOMAIN (or this host's name), renewed when it has less than 30 days left.
self_signed_cert() {
  local name=${HAR_DOMAIN:-$(hostname -f 2>/dev/null || hostname)}
  TLS_CERT="$HAR_TLS_DIR/selfsigned.crt"
  TLS_KEY="$HAR_TLS_DIR/selfsigned.key"
  # Kept while it has 30 days left and names this host: a new HAR_DOMAIN gets a new certificate.
  if [ -f "$TLS_CERT" ] && openssl x509 -checkend 2592000 -noout -in "$TLS_CERT" >/dev/null &&
    [ "$(openssl x509 -noout -subject -nameopt RFC2253 -in "$TLS_CERT")" = "subject=CN=$name" ]; then
    return
  fi
  log "creating a self-signed certificate for $name"
  (umask 077 && openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=$name" \
    -addext "subjectAltName=DNS:$name" -keyout "$TLS_KEY" -out "$TLS_CERT" 2>/dev/null)
  chmod 0644 "$TLS_CERT"
}

# The login's one copy lives in HAR_TLS_DIR/htpasswd, hashed (root:www-data 0640); a generated password also in
# HAR_TLS_DIR/basic-auth-password (root only). Neither the env file nor this log ever holds a password.
basic_auth() {
  HTPASSWD="$HAR_TLS_DIR/htpasswd"
  local password=$HAR_BASIC_AUTH_PASSWORD saved="$HAR_TLS_DIR/basic-auth-password"
  if [ -z "$HAR_BASIC_AUTH_USER" ]; then
    HTPASSWD=""
    log "login: none (the site is public)"
    return
  fi
  if [[ ! $HAR_BASIC_AUTH_USER =~ ^[A-Za-z0-9._-]+$ ]]; then
    log "HAR_BASIC_AUTH_USER may hold letters, digits, '.', '_' and '-' only"
    exit 2
  fi
  # The user's name compared whole ('.' is no pattern here).
  if [ -z "$password" ] && [ -f "$HTPASSWD" ] &&
    awk -F: -v u="$HAR_BASIC_AUTH_USER" '$1 == u { f = 1 } END { exit !f }' "$HTPASSWD"; then
    log "login: user $HAR_BASIC_AUTH_USER, password kept"
    return
  fi
  if [ -z "$password" ]; then
    password=$(openssl rand -base64 18)
    (umask 077 && printf '%s\n' "$password" >"$saved")
    log "login: user $HAR_BASIC_AUTH_USER, a new password generated: read it from $saved (root only)"
  else
    rm -f "$saved"  # an earlier generated password no longer opens the site
    log "login: user $HAR_BASIC_AUTH_USER, password from HAR_BASIC_AUTH_PASSWORD"
  fi
  local tmp hashed
  # The password goes through stdin: never on a command line (ps) nor in this log.
  hashed=$(printf '%s' "$password" | openssl passwd -6 -stdin)
  tmp=$(mktemp "$HTPASSWD.XXXXXX")
  printf '%s:%s\n' "$HAR_BASIC_AUTH_USER" "$hashed" >"$tmp"
  if [ "$(id -u)" = 0 ] && getent group "$NGINX_GROUP" >/dev/null; then chgrp "$NGINX_GROUP" "$tmp"; fi
  chmod 0640 "$tmp"
  mv -f "$tmp" "$HTPASSWD"
}

# Write the site from deploy/nginx/har-dashboard.conf and check the whole nginx configuration; keep the old site
# when the check fails.
render_site() {
  local tmp upload_mib
  # The proxy's body cap is the dashboard's upload cap, as the dashboard itself resolves it (params + HAR_*).
  upload_mib=$(cd "$HAR_APP_DIR" && "$VENV/bin/python" -c \
    'from lib.dashboard.settings import dashboard_params; print(dashboard_params().max_upload_mib)')
  tmp=$(mktemp "$HAR_TLS_DIR/site.XXXXXX")
  HAR_TLS_CERT=$TLS_CERT HAR_TLS_KEY=$TLS_KEY HAR_HTPASSWD=$HTPASSWD HAR_HSTS=$1 HAR_DOMAIN=$HAR_DOMAIN \
    HAR_PORT=$HAR_PORT HAR_MAX_UPLOAD_MIB=$upload_mib HAR_ACME_ROOT=$HAR_ACME_ROOT \
    bash "$HAR_APP_DIR/deploy/nginx/render.sh" >"$tmp"
  chmod 0644 "$tmp"
  if [ -f "$SITE" ]; then cp -p "$SITE" "$HAR_TLS_DIR/site.previous"; fi
  mv -f "$tmp" "$SITE"
  if ! nginx -t -q -c "$HAR_NGINX_DIR/nginx.conf"; then
    log "nginx refused the new configuration; the previous one is kept"
    if [ -f "$HAR_TLS_DIR/site.previous" ]; then mv -f "$HAR_TLS_DIR/site.previous" "$SITE"; else rm -f "$SITE"; fi
    exit 1
  fi
  log "wrote $SITE (nginx -t passed)"
}

reload_nginx() {
  if [ "$HAR_BOOTSTRAP_NO_SYSTEMD" = 1 ] || [ "$HAR_BOOTSTRAP_NO_START" = 1 ]; then return; fi
  # Out of memory, the kernel must pick a visitor's dashboard kernel (+800), never the proxy: same score as Voila.
  local dropin=/etc/systemd/system/nginx.service.d
  if [ ! -f "$dropin/har-oom.conf" ]; then
    mkdir -p "$dropin"
    printf '[Service]\nOOMScoreAdjust=-500\n' >"$dropin/har-oom.conf"
    systemctl daemon-reload
  fi
  systemctl enable --quiet nginx
  systemctl reload-or-restart nginx  # reload: open connections (websockets) stay up
}

setup_proxy() {
  if [ "$HAR_PROXY" != nginx ]; then
    if [ -f "$SITE" ]; then  # reached with --no-proxy only: the old site would go on serving with stale settings
      rm -f "$SITE"
      log "removed $SITE"
      reload_nginx
    fi
    log "no proxy (HAR_PROXY=none): Voila listens on $HAR_BIND:$HAR_PORT"
    return
  fi
  mkdir -p "$HAR_TLS_DIR" "$HAR_NGINX_DIR/conf.d" "$HAR_ACME_ROOT"
  chmod 0755 "$HAR_TLS_DIR"
  # Debian's default site also claims port 80 as the default server.
  rm -f "$HAR_NGINX_DIR/sites-enabled/default"
  basic_auth
  local live="$HAR_LETSENCRYPT_DIR/live/$HAR_DOMAIN"
  if [ -n "$HAR_CERT_EMAIL" ] && [ -f "$live/fullchain.pem" ]; then
    TLS_CERT="$live/fullchain.pem" TLS_KEY="$live/privkey.pem"
    render_site 1
    reload_nginx
    log "certificate: Let's Encrypt for $HAR_DOMAIN, HSTS on"
    return
  fi
  self_signed_cert
  render_site 0
  reload_nginx
  if [ -z "$HAR_CERT_EMAIL" ]; then log "certificate: self-signed, no HSTS"; return; fi
  if [ "$HAR_BOOTSTRAP_NO_SYSTEMD" = 1 ] || [ "$HAR_BOOTSTRAP_NO_START" = 1 ]; then  # nginx not reloaded
    log "certificate: self-signed for now; run again without --no-start/--no-systemd to get Let's Encrypt's"
    return
  fi
  # nginx now answers the HTTP-01 challenge on port 80 (DNS must point here and the security group allow 80).
  log "requesting a Let's Encrypt certificate for $HAR_DOMAIN"
  if certbot certonly --config-dir "$HAR_LETSENCRYPT_DIR" --webroot -w "$HAR_ACME_ROOT" -d "$HAR_DOMAIN" \
    -m "$HAR_CERT_EMAIL" --agree-tos --non-interactive --no-eff-email --keep-until-expiring \
    --deploy-hook "systemctl reload nginx"; then
    TLS_CERT="$live/fullchain.pem" TLS_KEY="$live/privkey.pem"
    render_site 1
    reload_nginx
    log "certificate: Let's Encrypt for $HAR_DOMAIN, HSTS on"
  else
    log "certbot failed: the site keeps its self-signed certificate (no HSTS); re-run this script to try again"
  fi
}

render_unit() {
  local dest=$1
  sed -e "s|@APP_DIR@|$HAR_APP_DIR|g" -e "s|@USER@|$HAR_USER|g" -e "s|@GROUP@|$(id -gn "$HAR_USER")|g" \
      -e "s|@STATE_DIR@|$HAR_STATE_DIR|g" -e "s|@ENV_FILE@|$HAR_ENV_FILE|g" \
      "$HAR_APP_DIR/deploy/$SERVICE.service" >"$dest.tmp"
  mv -f "$dest.tmp" "$dest"
}

# What a running service was started from: the unit, the env file and the code. Unchanged: no restart needed.
fingerprint() {
  { cat "$HAR_UNIT_DIR/$SERVICE.service" "$HAR_ENV_FILE"; git -C "$HAR_APP_DIR" rev-parse HEAD 2>/dev/null || true; } |
    sha256sum | cut -d' ' -f1
}

start_service() {
  if [ "$HAR_BOOTSTRAP_NO_SYSTEMD" = 1 ]; then
    render_unit "$HAR_STATE_DIR/$SERVICE.service"
    if [ "$HAR_BOOTSTRAP_NO_START" = 1 ]; then log "done (not started)"; return; fi
    log "starting Voila directly on $HAR_BIND:$HAR_PORT (no systemd)"
    cd "$HAR_APP_DIR"
    set -a
    # shellcheck disable=SC1090
    . "$HAR_ENV_FILE"
    set +a
    exec "$VENV/bin/voila" notebooks/dashboard.ipynb --no-browser "--Voila.ip=$HAR_BIND" "--port=$HAR_PORT"
  fi
  render_unit "$HAR_UNIT_DIR/$SERVICE.service"
  systemctl daemon-reload
  systemctl enable --quiet "$SERVICE"
  if [ "$HAR_BOOTSTRAP_NO_START" = 1 ]; then log "done (enabled, not started)"; return; fi
  local now stamp="$HAR_STATE_DIR/deployed.sha256"
  now=$(fingerprint)
  if systemctl is-active --quiet "$SERVICE" && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$now" ]; then
    log "service $SERVICE already runs this unit, settings and code: not restarted"
  else
    systemctl restart "$SERVICE"
    log "service $SERVICE (re)started; logs: journalctl -u $SERVICE -f"
  fi
  echo "$now" >"$stamp"
}

if [ "$MODEL_ONLY" = 1 ]; then
  pull_model
  write_env  # records the model choice (a pinned HAR_MODEL_VERSION stays pinned for later runs)
  log "new page loads serve $(basename "$(readlink "$CURRENT_MODEL")"); open pages keep the version they loaded"
  exit 0
fi
install_packages
create_user
fetch_code
install_python
prepare_state
pull_model
write_env
setup_proxy
start_service
