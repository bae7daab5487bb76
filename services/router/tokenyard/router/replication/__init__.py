"""Replication: this router's decisions shared with its peer routers, and theirs applied here."""
