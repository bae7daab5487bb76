"""Load generator for OpenAI-compatible streaming endpoints: ``python -m bench.loadgen --help``."""
