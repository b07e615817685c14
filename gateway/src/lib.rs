//! cairn-gateway: the S3 front door. It maps S3 requests onto the swarm and
//! the replicated metadata of `cairn-node`, and never talks to storage
//! nodes except through it.

pub use cairn_node as node;
