"""Generated from proto/ratelimitd/v1/ratelimit.proto by scripts/gen_protos.py; do not edit."""
