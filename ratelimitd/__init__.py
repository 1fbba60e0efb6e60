"""ratelimitd: exact hierarchical rate limits for LLM API platforms."""

__version__ = "0.1.0"
