//! End-to-end tests that start real Cairn clusters on loopback. The cluster
//! harness lands here with the swarm node.

pub use cairn_gateway as gateway;
pub use cairn_node as node;
pub use cairn_protocol as protocol;
