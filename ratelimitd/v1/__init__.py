"""Generated from proto/ratelimitd/v1 by scripts/gen_protos.py; do not edit."""
