//! Router tests against real nodes on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod client;
mod generate;
mod layer;
