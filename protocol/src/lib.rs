//! cairn-protocol: the pure core of Cairn, shared by the node, the gateway
//! and the simulator.
//!
//! Everything here is a function or a state machine fed with bytes, events
//! and the current time; nothing opens a socket, touches a disk, reads a
//! clock or draws randomness. The formats are normative in `spec/`.

pub mod cas;
pub mod checksum;
pub mod chunked;
pub mod codec;
pub mod dht;
pub mod encryption;
pub mod erasure;
pub mod guard;
pub mod hlc;
pub mod ids;
pub mod keywrap;
pub mod manifest;
pub mod membership;
pub mod meta;
pub mod metarpc;
pub mod pipeline;
pub mod placement;
pub mod records;
pub mod status;
pub mod version;
pub mod wire;

pub use codec::{DecodeError, from_hex, to_hex};
pub use ed25519_dalek;
