//! Tests of the file kinds (both directions).
