#!/usr/bin/env bash
# Regenerates meshcore/_gen from meshcore/proto/*.proto with the virtualenv's grpcio-tools.
# Idempotent: the output depends only on the .proto files and the grpcio-tools version.
# Usage: scripts/gen_protos.sh [OUTPUT_DIR]   (default meshcore/_gen; the tests pass a
# temporary directory to check that the committed code is up to date).
# protoc emits top-level imports between the generated modules ("import workload_pb2");
# they are rewritten to "from meshcore._gen import ..." so the package imports cleanly.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$(realpath -m "${1:-$repo/meshcore/_gen}")
cd "$repo"

python=${PYTHON:-"$repo/.venv/bin/python"}
src=meshcore/proto
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

protos=("$src"/*.proto)
modules=$(for proto in "${protos[@]}"; do basename "$proto" .proto; done | paste -sd'|')

# grpc_tools.protoc run as a module adds its bundled google/protobuf includes itself.
"$python" -m grpc_tools.protoc -I "$src" \
  --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" "${protos[@]}"

# grpc_python_out writes a stub module for every proto; keep only those with services.
for stub in "$tmp"/*_pb2_grpc.py; do
  grep -q '^class .*Stub' "$stub" || rm "$stub"
done

sed -E -i \
  -e "s/^import (${modules})_pb2 as /from meshcore._gen import \1_pb2 as /" \
  "$tmp"/*.py "$tmp"/*.pyi

printf '"""Code generated from meshcore/proto by scripts/gen_protos.sh; do not edit."""\n' \
  >"$tmp/__init__.py"

# Replace only generated files, so stale modules of deleted protos go but nothing else does.
mkdir -p "$out"
rm -f "$out"/__init__.py "$out"/*_pb2.py "$out"/*_pb2.pyi "$out"/*_pb2_grpc.py
cp "$tmp"/* "$out"/
echo "gen_protos: wrote $(ls "$tmp" | wc -l) files to $out"
