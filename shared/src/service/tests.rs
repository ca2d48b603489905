//! Service unit tests over the embedded adapters.
