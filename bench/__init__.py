"""pricefeed benchmark harness: ``python -m bench --help``."""
