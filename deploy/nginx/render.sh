#!/usr/bin/env bash
# Print deploy/nginx/har-dashboard.conf with its placeholders filled in from HAR_* variables (bootstrap.sh and the
# tests call it; nothing else writes the proxy configuration).
#
#   HAR_TLS_CERT=/path/fullchain.pem HAR_TLS_KEY=/path/privkey.pem bash deploy/nginx/render.sh > har-dashboard.conf
#
# Variables (defaults in brackets):
#   HAR_TLS_CERT, HAR_TLS_KEY     certificate chain and key (required)
#   HAR_DOMAIN                    [_ : any name]  server_name
#   HAR_PORT                      [8866]  Voila's port on 127.0.0.1
#   HAR_PROXY_ADDR                [all]   listen address;  HAR_HTTPS_PORT [443]  HAR_HTTP_PORT [80]
#   HAR_MAX_UPLOAD_MIB            [20]    largest HTTP request body, as the dashboard's per-file cap
#   HAR_HTPASSWD                  [none]  basic-auth user file; unset: no login
#   HAR_HSTS                      [0]     1: Strict-Transport-Security (only with a certificate browsers trust)
#   HAR_ACME_ROOT                 [/var/www/har-acme]  Let's Encrypt HTTP-01 webroot
#   HAR_PROXY_PAGE_RATE           [10r/m] page loads (kernel starts) per client address, after a burst of
#   HAR_PROXY_PAGE_BURST          [5]
#   HAR_PROXY_MAX_SOCKETS         [4]     kernel websockets (open tabs) per client address
#   HAR_PROXY_MAX_CONNS           [32]    connections per client address
#   HAR_PROXY_TRUSTED_CIDR        [none]  load balancer's address range: take the client from X-Forwarded-For
set -euo pipefail

TEMPLATE="$(dirname "$0")/har-dashboard.conf"

fail() { echo "render.sh: $*" >&2; exit 2; }

# Values go into nginx syntax through sed: allow only characters that cannot break either.
check() {
  local name=$1 value=$2 pattern=$3
  [[ $value =~ ^($pattern)$ ]] || fail "$name='$value' is not valid (expected $pattern)"
}

cert=${HAR_TLS_CERT:?set HAR_TLS_CERT to the certificate chain file}
key=${HAR_TLS_KEY:?set HAR_TLS_KEY to the private key file}
domain=${HAR_DOMAIN:-_}
port=${HAR_PORT:-8866}
addr=${HAR_PROXY_ADDR:-}
https_port=${HAR_HTTPS_PORT:-443}
http_port=${HAR_HTTP_PORT:-80}
max_mib=${HAR_MAX_UPLOAD_MIB:-20}
htpasswd=${HAR_HTPASSWD:-}
hsts=${HAR_HSTS:-0}
acme_root=${HAR_ACME_ROOT:-/var/www/har-acme}
page_rate=${HAR_PROXY_PAGE_RATE:-10r/m}
page_burst=${HAR_PROXY_PAGE_BURST:-5}
max_sockets=${HAR_PROXY_MAX_SOCKETS:-4}
max_conns=${HAR_PROXY_MAX_CONNS:-32}
trusted=${HAR_PROXY_TRUSTED_CIDR:-}

path='/[A-Za-z0-9._/+-]*'
check HAR_TLS_CERT "$cert" "$path"
check HAR_TLS_KEY "$key" "$path"
check HAR_DOMAIN "$domain" '_|[A-Za-z0-9.-]+'
check HAR_PORT "$port" '[0-9]{1,5}'
check HAR_PROXY_ADDR "$addr" '|[0-9.]+|\[[0-9A-Fa-f:]+\]'
check HAR_HTTPS_PORT "$https_port" '[0-9]{1,5}'
check HAR_HTTP_PORT "$http_port" '[0-9]{1,5}'
check HAR_MAX_UPLOAD_MIB "$max_mib" '[0-9]+(\.[0-9]+)?'
check HAR_HTPASSWD "$htpasswd" "|$path"
check HAR_HSTS "$hsts" '0|1'
check HAR_ACME_ROOT "$acme_root" "$path"
check HAR_PROXY_PAGE_RATE "$page_rate" '[0-9]+r/[sm]'
check HAR_PROXY_PAGE_BURST "$page_burst" '[0-9]+'
check HAR_PROXY_MAX_SOCKETS "$max_sockets" '[1-9][0-9]*'
check HAR_PROXY_MAX_CONNS "$max_conns" '[1-9][0-9]*'
check HAR_PROXY_TRUSTED_CIDR "$trusted" '|[0-9A-Fa-f.:]+/[0-9]{1,3}'

listen_prefix=${addr:+$addr:}
https_suffix=":$https_port"
if [ "$https_port" = 443 ]; then https_suffix=""; fi
# client_max_body_size takes whole units: the cap in KiB, rounded up.
max_body="$(awk -v m="$max_mib" 'BEGIN { k = m * 1024; printf "%d", (k == int(k)) ? k : int(k) + 1 }')k"
if [ -n "$htpasswd" ]; then
  auth="auth_basic \"HAR dashboard\"; auth_basic_user_file $htpasswd;"
else
  auth="auth_basic off;  # no login (HAR_BASIC_AUTH_USER unset)"
fi
if [ "$hsts" = 1 ]; then
  hsts_line='add_header Strict-Transport-Security "max-age=31536000" always;'
else
  hsts_line="# no HSTS: the certificate is not one browsers trust"
fi
if [ -n "$trusted" ]; then
  real_ip="set_real_ip_from $trusted; real_ip_header X-Forwarded-For; real_ip_recursive on;"
else
  real_ip="# HAR_PROXY_TRUSTED_CIDR unset: clients connect directly"
fi

sed -e "s|@UPSTREAM@|127.0.0.1:$port|g" \
  -e "s|@SERVER_NAME@|$domain|g" \
  -e "s|@HTTP_LISTEN@|$listen_prefix$http_port|g" \
  -e "s|@HTTPS_LISTEN@|$listen_prefix$https_port|g" \
  -e "s|@HTTPS_PORT_SUFFIX@|$https_suffix|g" \
  -e "s|@CERT@|$cert|g" \
  -e "s|@KEY@|$key|g" \
  -e "s|@MAX_BODY@|$max_body|g" \
  -e "s|@AUTH@|$auth|g" \
  -e "s|@HSTS@|$hsts_line|g" \
  -e "s|@REAL_IP@|$real_ip|g" \
  -e "s|@ACME_ROOT@|$acme_root|g" \
  -e "s|@PAGE_RATE@|$page_rate|g" \
  -e "s|@PAGE_BURST@|$page_burst|g" \
  -e "s|@MAX_SOCKETS@|$max_sockets|g" \
  -e "s|@MAX_CONNS@|$max_conns|g" \
  "$TEMPLATE"
