//! Simulations and benchmarks of expertnet networks on one machine.
//!
//! The `expertnet-sim` binary runs a small network end to end (`demo`), generates
//! checkpoints (`make-checkpoint`) and measures nodes (`bench node`, `bench dht`); the checkpoint generator itself lives in `expertnet-model` so that every
//! crate's tests can use it.

#![forbid(unsafe_code)]

pub mod bench;
pub mod demo;
pub mod dht_bench;
