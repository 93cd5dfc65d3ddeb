//! Node tests against real gRPC servers on 127.0.0.1 with OS-chosen ports. One test binary
//! holds every module so the large dependency graph is linked once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod daemon;
mod discovery;
mod forward;
mod limits;
mod startup;
