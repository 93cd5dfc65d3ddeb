//! The routing policy: which node serves which tokens, free of I/O.
//!
//! [`LayerCall`] plans one MoE layer call and reacts to answers and time; [`PeerBook`]
//! keeps what the router learns about nodes across calls. Neither does I/O: the time, the
//! randomness and the answers come from the caller, so tests run them deterministically
//! and the simulator drives them at scale in virtual time.

mod call;
mod peers;

pub use call::{
    Answer, CallError, CallResult, CallSettings, Dispatch, LayerCall, ReplicaRef, ServedExpert,
    TaskFailure, TaskRef,
};
pub use peers::{PeerBook, PeerPolicy};
