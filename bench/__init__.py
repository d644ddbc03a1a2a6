"""Bench suites and the ahead-of-time audit of llama_fast (``python -m bench --help``)."""
