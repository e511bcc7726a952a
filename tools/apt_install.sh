#!/usr/bin/env bash
# Install the Debian packages named as arguments with apt-get (as root,
# or through sudo); nothing to do without arguments. Used by setup.sh
# and demo.sh, which decide what is missing.
set -euo pipefail
[ "$#" -gt 0 ] || exit 0
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
echo "installing $* with apt-get ..."
"${sudo[@]}" apt-get update -q
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends "$@"
