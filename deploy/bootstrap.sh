#!/usr/bin/env bash
# Install and start the dashboard on a Debian 12 / Ubuntu 24.04 EC2 instance (Python 3.11-3.12). EC2 user-data; re-runnable.
#
#   HAR_REPO_URL=https://git.example.com/you/har-vit.git HAR_REGISTRY=s3://my-bucket/models \
#     bash deploy/bootstrap.sh
#
# Steps: apt packages -> service user -> code (git clone/update, or code already in HAR_APP_DIR) -> venv +
# pip install -e . -> pull the model from the registry (verified, cached) -> env file -> systemd unit -> start.
# Variables (defaults in brackets):
#   HAR_REGISTRY        registry URL, s3://bucket/prefix or a folder (required)
#   HAR_MODEL_NAME      [har-vit]      HAR_MODEL_VERSION [latest]
#   HAR_REPO_URL        git URL to clone into HAR_APP_DIR (unset: HAR_APP_DIR must already hold the code)
#   HAR_REPO_REF        [main]         branch, tag or commit to check out
#   HAR_APP_DIR         [/opt/har-vit] HAR_USER [har]  HAR_STATE_DIR [/var/lib/har-vit]
#   HAR_ENV_FILE        [/etc/har-dashboard.env]        HAR_UNIT_DIR [/etc/systemd/system]
#   HAR_PORT            [8866]         HAR_BIND [0.0.0.0]
#   HAR_MAX_KERNELS     [8]            HAR_KERNEL_IDLE_SECONDS [600]   HAR_MAX_UPLOAD_MIB [20]
#   HAR_PYTHON          [python3]      HAR_PIP_ARGS (extra pip arguments, e.g. a CPU-only PyTorch index)
#   HAR_SKIP_APT=1      skip apt-get   HAR_SKIP_PIP=1 skip venv creation and pip
#   HAR_BOOTSTRAP_NO_SYSTEMD=1 (or --no-systemd): no unit install; exec Voila in the foreground instead
#   HAR_BOOTSTRAP_NO_START=1   (or --no-start): do every step but start nothing
set -euo pipefail

for arg in "$@"; do
  case "$arg" in
    --no-systemd) HAR_BOOTSTRAP_NO_SYSTEMD=1 ;;
    --no-start) HAR_BOOTSTRAP_NO_START=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "bootstrap: unknown argument $arg" >&2; exit 2 ;;
  esac
done

: "${HAR_REGISTRY:?set HAR_REGISTRY to s3://bucket/prefix (or a registry folder)}"
HAR_MODEL_NAME=${HAR_MODEL_NAME:-har-vit}
HAR_MODEL_VERSION=${HAR_MODEL_VERSION:-latest}
HAR_REPO_URL=${HAR_REPO_URL:-}
HAR_REPO_REF=${HAR_REPO_REF:-main}
HAR_APP_DIR=${HAR_APP_DIR:-/opt/har-vit}
HAR_USER=${HAR_USER:-har}
HAR_STATE_DIR=${HAR_STATE_DIR:-/var/lib/har-vit}
HAR_ENV_FILE=${HAR_ENV_FILE:-/etc/har-dashboard.env}
HAR_UNIT_DIR=${HAR_UNIT_DIR:-/etc/systemd/system}
HAR_PORT=${HAR_PORT:-8866}
HAR_BIND=${HAR_BIND:-0.0.0.0}
HAR_MAX_KERNELS=${HAR_MAX_KERNELS:-8}
HAR_KERNEL_IDLE_SECONDS=${HAR_KERNEL_IDLE_SECONDS:-600}
HAR_MAX_UPLOAD_MIB=${HAR_MAX_UPLOAD_MIB:-20}
HAR_PYTHON=${HAR_PYTHON:-python3}
HAR_PIP_ARGS=${HAR_PIP_ARGS:-}
HAR_SKIP_APT=${HAR_SKIP_APT:-0}
HAR_SKIP_PIP=${HAR_SKIP_PIP:-0}
HAR_BOOTSTRAP_NO_SYSTEMD=${HAR_BOOTSTRAP_NO_SYSTEMD:-0}
HAR_BOOTSTRAP_NO_START=${HAR_BOOTSTRAP_NO_START:-0}
SERVICE=har-dashboard
CACHE_DIR="$HAR_STATE_DIR/registry-cache"
VENV="$HAR_APP_DIR/.venv"

log() { echo "[bootstrap] $*" >&2; }

# Run a command as the service user (directly when we already are that user).
as_user() {
  if [ "$(id -un)" = "$HAR_USER" ]; then "$@"; else runuser -u "$HAR_USER" -- "$@"; fi
}

install_packages() {
  if [ "$HAR_SKIP_APT" = 1 ]; then log "skipping apt (HAR_SKIP_APT=1)"; return; fi
  log "installing apt packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends python3 python3-venv python3-pip git ca-certificates
}

create_user() {
  if id -u "$HAR_USER" >/dev/null 2>&1; then return; fi
  log "creating system user $HAR_USER"
  useradd --system --home-dir "$HAR_STATE_DIR" --no-create-home --shell /usr/sbin/nologin "$HAR_USER"
}

fetch_code() {
  if [ -n "$HAR_REPO_URL" ]; then
    if [ -d "$HAR_APP_DIR/.git" ]; then
      log "updating $HAR_APP_DIR to $HAR_REPO_REF"
      git -C "$HAR_APP_DIR" fetch --quiet origin "$HAR_REPO_REF"
      git -C "$HAR_APP_DIR" checkout --quiet --force FETCH_HEAD
    else
      log "cloning $HAR_REPO_URL into $HAR_APP_DIR"
      git clone --quiet "$HAR_REPO_URL" "$HAR_APP_DIR"
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
  log "pip install -e $HAR_APP_DIR"
  # shellcheck disable=SC2086  # HAR_PIP_ARGS is a list of words on purpose
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # shellcheck disable=SC2086
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
  MODEL_DIR=$(cd "$HAR_APP_DIR" && as_user env HOME="$HAR_STATE_DIR" "$VENV/bin/python" -m lib.registry pull "$HAR_REGISTRY" \
    --model "$HAR_MODEL_NAME" --version "$HAR_MODEL_VERSION" --cache-dir "$CACHE_DIR" | tail -n 1)
  if [ ! -d "$MODEL_DIR/model" ]; then
    log "pull did not produce a model folder (got '$MODEL_DIR')"
    exit 1
  fi
  log "model ready in $MODEL_DIR"
}

write_env() {
  local tmp
  tmp=$(mktemp "$HAR_ENV_FILE.XXXXXX")
  cat >"$tmp" <<ENV
# Written by deploy/bootstrap.sh; HAR_* variables override params/demo.yaml's dashboard section.
HAR_REGISTRY=$HAR_REGISTRY
HAR_MODEL_NAME=$HAR_MODEL_NAME
HAR_MODEL_VERSION=$HAR_MODEL_VERSION
HAR_MODEL_DIR=$MODEL_DIR
HAR_REGISTRY_CACHE=$CACHE_DIR
HAR_PORT=$HAR_PORT
HAR_BIND=$HAR_BIND
HAR_MAX_KERNELS=$HAR_MAX_KERNELS
HAR_KERNEL_IDLE_SECONDS=$HAR_KERNEL_IDLE_SECONDS
HAR_MAX_UPLOAD_MIB=$HAR_MAX_UPLOAD_MIB
ENV
  if [ "$(id -u)" = 0 ] && [ "$HAR_USER" != root ]; then chgrp "$(id -gn "$HAR_USER")" "$tmp"; fi
  chmod 0640 "$tmp"
  mv -f "$tmp" "$HAR_ENV_FILE"
  log "wrote $HAR_ENV_FILE"
}

render_unit() {
  local dest=$1
  sed -e "s|@APP_DIR@|$HAR_APP_DIR|g" -e "s|@USER@|$HAR_USER|g" -e "s|@GROUP@|$(id -gn "$HAR_USER")|g" \
      -e "s|@STATE_DIR@|$HAR_STATE_DIR|g" -e "s|@ENV_FILE@|$HAR_ENV_FILE|g" \
      "$HAR_APP_DIR/deploy/$SERVICE.service" >"$dest.tmp"
  mv -f "$dest.tmp" "$dest"
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
  if [ "$HAR_BOOTSTRAP_NO_START" = 1 ]; then systemctl enable "$SERVICE"; log "done (enabled, not started)"; return; fi
  systemctl enable "$SERVICE"
  systemctl restart "$SERVICE"
  log "service $SERVICE (re)started; logs: journalctl -u $SERVICE -f"
}

install_packages
create_user
fetch_code
install_python
prepare_state
pull_model
write_env
start_service
