"""Code generated from meshcore/proto by scripts/gen_protos.sh; do not edit."""
