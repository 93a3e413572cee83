//! checkpoint and restore engine.
