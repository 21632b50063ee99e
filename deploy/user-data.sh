#!/bin/bash
# EC2 user data for Debian 12 or Ubuntu 24.04: cloud-init runs it once, as root, at first boot (log:
# /var/log/cloud-init-output.log). It installs git, clones the code and runs deploy/bootstrap.sh, which does the rest.
# Fill in the values below. No secrets here: anyone on the instance can read user data from the metadata service.
set -euo pipefail

export HAR_REPO_URL=https://github.com/your-org/har-vit.git  # public, or reachable with the instance's credentials
export HAR_REPO_REF=main                    # branch, tag or commit
export HAR_REGISTRY=s3://your-bucket/models # the instance role needs s3:ListBucket and s3:GetObject on it
export HAR_MODEL_NAME=har-vit
export HAR_DOMAIN=""                        # e.g. har.example.com (DNS pointing here); empty: a self-signed certificate
export HAR_CERT_EMAIL=""                    # with HAR_DOMAIN: a Let's Encrypt certificate, renewed by certbot's timer
export HAR_BASIC_AUTH_USER=team             # login; its password: /etc/nginx/har-dashboard/basic-auth-password
export HAR_APP_DIR=/opt/har-vit

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends git ca-certificates
if [ ! -d "$HAR_APP_DIR/.git" ]; then
  git clone --quiet "$HAR_REPO_URL" "$HAR_APP_DIR"
fi
bash "$HAR_APP_DIR/deploy/bootstrap.sh"
