//! cairn-node: the swarm daemon. It joins nodes of several sites into an
//! authenticated libp2p swarm, stores fragments and replicated metadata, and
//! runs the background workers. It drives the sans-IO logic of
//! `cairn-protocol`; it never depends on the gateway.

mod batching;
mod blocklist;
mod budget;
mod client;
pub mod clock;
pub mod config;
pub mod dht;
mod event_loop;
mod gate;
mod hello;
pub mod identity;
mod inbound;
pub mod mapsync;
pub mod members;
pub mod meta;
mod outbound;
pub mod pieces;
pub mod release;
pub mod scrub;
pub mod store;
pub mod swarm;
pub mod workers;

pub use cairn_protocol as protocol;
