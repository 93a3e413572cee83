//! Parsers for /proc files.
