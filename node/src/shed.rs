//! Shedding (spec/repair.md, "Shedding"): a node drops its copy of a
//! fragment once the fragment lives on the node placement names for it
//! (a rebalance or a write's hand-off left the copy here). The node asks
//! for no one's word: it computes the placement under its own map and
//! asks the placed node itself whether it holds the fragment.

use std::sync::Arc;
use std::time::Duration;

use cairn_protocol::erasure::Scheme;
use cairn_protocol::ids::{FragmentId, NodeId};
use cairn_protocol::placement::{Placer, segment_placement_key};

use crate::identity::peer_id_of;
use crate::mapsync::MapKeeper;
use crate::members::Members;
use crate::pieces;

/// How long the placed node is given to say whether it holds the fragment.
const CONFIRM_DEADLINE: Duration = Duration::from_secs(10);

/// What a node needs to decide a shed by itself.
pub(crate) struct ShedCheck {
    pub(crate) own: NodeId,
    pub(crate) maps: Arc<MapKeeper>,
    pub(crate) control: libp2p_stream::Control,
    pub(crate) members: Arc<Members>,
}

impl ShedCheck {
    /// Whether this node may trash its copy of `fragments[index]`: under
    /// its map the segment is placed on nodes that do not include this one
    /// for that fragment (under any index: ids can repeat), and the node
    /// placed for `index` holds it now. `Err` says why not.
    pub(crate) async fn may_shed(
        &self,
        scheme: Scheme,
        index: usize,
        fragments: &[FragmentId],
    ) -> Result<(), String> {
        let map = self.maps.current().ok_or("this node has no map yet")?;
        let placer = Placer::new(&map.map, scheme, map.tolerance)
            .map_err(|e| format!("scheme {scheme} has no placement on this map: {e}"))?;
        let placed = placer.place(&segment_placement_key(fragments));
        if placed.len() != fragments.len() {
            return Err(format!(
                "the map places {} of the segment's {} fragments",
                placed.len(),
                fragments.len()
            ));
        }
        let id = fragments[index];
        if placed
            .iter()
            .zip(fragments)
            .any(|(node, fragment)| *node == self.own && *fragment == id)
        {
            return Err("placement names this node for the fragment".into());
        }
        let holder = placed[index];
        let peer = peer_id_of(&holder).map_err(|e| e.to_string())?;
        if !self.members.contains(&peer) {
            return Err(format!("its placed node {holder} is not connected here"));
        }
        let asked = async {
            let stream = self
                .control
                .clone()
                .open_stream(peer, pieces::PROTOCOL)
                .await
                .map_err(|e| e.to_string())?;
            pieces::have(stream, vec![id])
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(CONFIRM_DEADLINE, asked).await {
            Ok(Ok(held)) if held == [true] => Ok(()),
            Ok(Ok(_)) => Err(format!("its placed node {holder} does not hold it")),
            Ok(Err(error)) => Err(format!(
                "its placed node {holder} could not be asked: {error}"
            )),
            Err(_) => Err(format!("its placed node {holder} did not answer in time")),
        }
    }
}
