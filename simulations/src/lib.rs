//! cairn-sim: the network simulation harness (real nodes under injected
//! faults) and the large-scale simulator (the protocol crate's placement and
//! repair logic over thousands of simulated nodes).

pub use cairn_gateway as gateway;
pub use cairn_node as node;
pub use cairn_protocol as protocol;
