"""The shared library: what every Tokenyard service needs and nothing service-specific."""
