//! Simulations and benchmarks of expertnet networks on one machine.
//!
//! The `expertnet-sim` binary runs a small network end to end (`demo`), runs scenarios with
//! real nodes and faults (`run`) and the router's policy over modeled nodes in virtual
//! time (`virtual`), generates checkpoints (`make-checkpoint`) and measures nodes,
//! discovery, whole layers and generation (`bench node`, `bench dht`, `bench layer`,
//! `bench generate`).
//! The checkpoint generator itself lives in `expertnet-model` so that every crate's tests
//! can use it.

#![forbid(unsafe_code)]

pub mod bench;
pub mod demo;
pub mod dht_bench;
pub mod generate_bench;
pub mod layer_bench;
pub mod network;
pub mod scenario;
pub mod virtual_time;
