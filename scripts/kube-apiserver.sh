#!/usr/bin/env bash
# A real Kubernetes API server (v1.20.2 built from Debian bookworm's source package) and its
# etcd, on loopback only, for the tests of istiod_lite's kube source. Test fixture only: this
# API server is old and has known security holes (../shared/reference/kube-apiserver-here.md).
#
#   scripts/kube-apiserver.sh build
#       Build kube-apiserver once per machine into $KUBE_APISERVER_CACHE (root; about 5 minutes,
#       2.2 GB scratch under /var/tmp, removed afterwards). Returns at once when it is cached.
#   scripts/kube-apiserver.sh run DIR [PORT [ETCD_PORT [ETCD_PEER_PORT]]]
#       Start etcd and kube-apiserver with all their state under DIR (fresh every run). Writes
#       DIR/kubeconfig (static admin token, group system:masters) once /readyz answers, then
#       runs until SIGTERM/SIGINT or until the process that started it exits.
#
# No registry ships a kube-apiserver binary, so it is built from source; the binary stays in
# the cache outside the checkout and is never committed.
set -euo pipefail

version=1.20.2
cache=${KUBE_APISERVER_CACHE:-/var/cache/ambient-mesh/kube-v$version}
apiserver=$cache/bin/kube-apiserver

die() {
  echo "kube-apiserver.sh: $*" >&2
  exit 1
}

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return
  echo "kube-apiserver.sh: installing build dependencies: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }
}

build() {
  if [ -x "$apiserver" ]; then
    echo "kube-apiserver.sh: using cached $apiserver"
    return
  fi
  [ "$(id -u)" -eq 0 ] || die "building kube-apiserver needs root (apt-get); run: sudo $0 build"
  mkdir -p "$cache"
  # Concurrent test runs on one machine: one builds, the others wait for its binary.
  exec 9>"$cache/.build.lock"
  flock 9
  if [ -x "$apiserver" ]; then
    return
  fi

  # Go 1.19 builds v1.20.2; the two -dev packages replace vendored libraries (see below).
  apt_install golang-go rsync make dpkg-dev \
    golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev

  scratch=$(mktemp -d /var/tmp/kube-apiserver-build.XXXXXX)
  trap 'rm -rf "$scratch"' EXIT
  cd "$scratch"

  # Source packages need deb-src entries. A private apt configuration derived from the
  # machine's deb822 sources leaves the system's own apt setup untouched.
  mkdir -p apt/parts apt/lists/partial
  for sources in /etc/apt/sources.list.d/*.sources; do
    [ -f "$sources" ] && grep -q "debian" "$sources" &&
      sed 's/^Types: deb$/Types: deb-src/' "$sources" >"apt/parts/$(basename "$sources")"
  done
  ls apt/parts/*.sources >/dev/null 2>&1 || die "no Debian deb822 sources under /etc/apt/sources.list.d"
  apt_options=(
    -o Dir::Etc::SourceParts="$scratch/apt/parts" -o Dir::Etc::SourceList=/dev/null
    -o Dir::State::Lists="$scratch/apt/lists" -o APT::Sandbox::User=root
  )
  apt-get "${apt_options[@]}" update -qq
  # Newer Debian releases cut this source package down to kubectl; bookworm's is the full tree.
  apt-get "${apt_options[@]}" source --download-only kubernetes >/dev/null
  dsc=$(ls kubernetes_*really${version}*.dsc 2>/dev/null) ||
    die "Debian's kubernetes source is not v$version: $(ls kubernetes_*.dsc)"
  dpkg-source -x --no-check "$dsc" src >/dev/null # applies debian/patches/series in order
  cd src

  # The vendored reflect2 v1.0.1 builds with Go 1.19 but faults at run time (map iteration,
  # on the first custom-resource create); Debian's reflect2 1.0.2 and json-iterator 1.1.12
  # are the fixed versions.
  for lib in github.com/modern-go/reflect2 github.com/json-iterator/go; do
    rm -rf "vendor/$lib"
    cp -r "/usr/share/gocode/src/$lib" "vendor/$lib"
    find "vendor/$lib" -name '*_test.go' -delete
  done

  # Upstream's make in GOPATH mode, as debian/rules does: it runs the code generators
  # (openapi-gen, ...) that a plain `go build -mod=vendor` lacks.
  mkdir -p .go/src/k8s.io
  ln -sfn ../../.. .go/src/k8s.io/kubernetes
  echo "kube-apiserver.sh: building kube-apiserver v$version (about 5 minutes)"
  env GOPATH="$PWD/.go" GOCACHE="$scratch/gocache" GOPROXY=off CGO_ENABLED=0 HOME="$scratch" \
    PATH="/usr/lib/go/bin:$PATH" make WHAT=cmd/kube-apiserver >"$scratch/make.log" 2>&1 ||
    { tail -n 40 "$scratch/make.log" >&2; die "make failed (log above)"; }

  install -D -m 0755 _output/bin/kube-apiserver "$apiserver.tmp"
  mv "$apiserver.tmp" "$apiserver"
  echo "kube-apiserver.sh: built $apiserver"
}

# kube-apiserver first (it keeps retrying a vanished etcd for a minute and more), given 3 s
# to stop on SIGTERM (inside the 5 s its owner waits for this script) and then killed, so no
# test run leaves it behind; then etcd.
stop_servers() {
  local apiserver_pid=$1 etcd_pid=$2
  kill "$apiserver_pid" 2>/dev/null || true # (set -e: a process already gone is fine)
  for _ in $(seq 30); do
    kill -0 "$apiserver_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$apiserver_pid" 2>/dev/null || true
  kill "$etcd_pid" 2>/dev/null || true
  wait
}

run() {
  local dir=${1:?usage: $0 run DIR [PORT [ETCD_PORT [ETCD_PEER_PORT]]]}
  local port=${2:-26443} etcd_port=${3:-22379} peer_port=${4:-22380}
  [ -x "$apiserver" ] || die "kube-apiserver is not built; run: sudo $0 build"
  command -v etcd >/dev/null || die "etcd not found; install Debian's etcd-server (scripts/setup.sh does)"
  local owner=$PPID
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  rm -rf "$dir/etcd" "$dir/certs" "$dir/kubeconfig"
  mkdir -p "$dir/certs"

  # Static admin token (group system:masters) and the service-account signing key pair that
  # TokenRequest / TokenReview use.
  local token
  token=$(openssl rand -hex 24)
  (umask 077 && echo "$token,admin,admin,system:masters" >"$dir/tokens.csv")
  openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
  openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null

  local etcd_url=http://127.0.0.1:$etcd_port
  etcd --name test --data-dir "$dir/etcd" \
    --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "test=http://127.0.0.1:$peer_port" \
    --unsafe-no-fsync >"$dir/etcd.log" 2>&1 &
  local etcd_pid=$!

  # - ServiceAccount admission is off: without kube-controller-manager no SA token Secrets
  #   exist, and it would refuse every pod.
  # - No watch cache for serviceaccounts: their watches go straight to etcd, so a test can
  #   force "410 Gone" by compacting etcd past a watcher's resourceVersion.
  "$apiserver" \
    --etcd-servers "$etcd_url" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$port" \
    --cert-dir "$dir/certs" \
    --token-auth-file "$dir/tokens.csv" \
    --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$dir/sa.pub" \
    --service-account-signing-key-file "$dir/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 \
    --allow-privileged=true \
    --disable-admission-plugins ServiceAccount \
    --watch-cache-sizes serviceaccounts#0 \
    >"$dir/kube-apiserver.log" 2>&1 &
  local apiserver_pid=$!
  # shellcheck disable=SC2064 # expand the pids now
  trap "stop_servers $apiserver_pid $etcd_pid" EXIT
  trap "exit 0" TERM INT

  local deadline=$((SECONDS + 60))
  until curl -fsS -o /dev/null --cacert "$dir/certs/apiserver.crt" \
    -H "Authorization: Bearer $token" "https://127.0.0.1:$port/readyz" 2>/dev/null; do
    kill -0 "$apiserver_pid" 2>/dev/null ||
      { tail -n 20 "$dir/kube-apiserver.log" >&2; die "kube-apiserver exited (log above)"; }
    kill -0 "$etcd_pid" 2>/dev/null || { tail -n 20 "$dir/etcd.log" >&2; die "etcd exited (log above)"; }
    [ $SECONDS -lt $deadline ] || die "kube-apiserver not ready after 60 s; see $dir/kube-apiserver.log"
    sleep 0.2
  done

  cat >"$dir/kubeconfig.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority: $dir/certs/apiserver.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
EOF
  mv "$dir/kubeconfig.tmp" "$dir/kubeconfig"
  echo "kube-apiserver.sh: ready at https://127.0.0.1:$port (etcd $etcd_url); kubeconfig $dir/kubeconfig"

  # Stop with the owner: a test run that is killed must not leave servers behind.
  while kill -0 "$owner" 2>/dev/null; do
    kill -0 "$apiserver_pid" 2>/dev/null || die "kube-apiserver exited; see $dir/kube-apiserver.log"
    kill -0 "$etcd_pid" 2>/dev/null || die "etcd exited; see $dir/etcd.log"
    sleep 1 &
    wait $! # interruptible, so SIGTERM is handled at once
  done
}

case "${1:-}" in
  build) build ;;
  run) shift && run "$@" ;;
  *) die "usage: $0 build | run DIR [PORT [ETCD_PORT [ETCD_PEER_PORT]]]" ;;
esac
