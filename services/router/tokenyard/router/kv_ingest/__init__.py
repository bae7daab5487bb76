"""KV ingestion: each worker's Describe and KV event stream, applied to the index."""
