#!/usr/bin/env bash
# Idempotent set-up shared by scripts/test and scripts/demo: the Debian tools the tests and
# benchmarks use, and a virtual environment with the project installed editable.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

debs=(wrk nginx-light iperf3 nghttp2-client tcpdump nftables iproute2 curl etcd-server prometheus chromium)
missing=()
for pkg in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
# kubectl: any package's will do (another repository's `kubectl` package owns the same path).
command -v kubectl >/dev/null || missing+=(kubernetes-client)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: missing Debian packages (${missing[*]}); run as root to install them, tests that need them will skip" >&2
  fi
fi

stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "setup: creating .venv and installing the project with its test extra"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[test]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# The kube source's tests run against a real kube-apiserver, built once per machine from
# Debian's source package and cached outside the checkout (a no-op when cached).
if [ "$(id -u)" -eq 0 ]; then
  "$repo/scripts/kube-apiserver.sh" build
fi

# The one-machine mesh's kube-proxy-style service NAT between pods of one node needs
# br_netfilter (`ambientctl up` says so clearly if it is still missing).
if [ "$(id -u)" -eq 0 ] && [ ! -d /proc/sys/net/bridge ]; then
  modprobe br_netfilter 2>/dev/null || echo "setup: could not load br_netfilter; \`ambientctl up\` will explain" >&2
fi
