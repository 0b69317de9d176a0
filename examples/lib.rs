//! Runnable examples of the data sandbox live beside this file; run one with
//! `cargo run -p sandbox-examples --example <name>`.
