//! Who is who in a cluster: its nodes, the identities they are home to, and which node may
//! take over which identity.
//!
//! Nodes and identities are both numbered in configuration order, and identity `i` is at
//! home on node `i` and named after it, but they are different things: a node is a guest
//! (a QEMU process and its agent), an identity is an address and an export that moves
//! between nodes. The types keep them apart.

/// A node: a guest and its agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(usize);

/// An identity: an NBD export and the address clients reach it at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityId(usize);

impl NodeId {
    /// The node at `index` in configuration order: for tables kept per node, which have
    /// one entry per node of the topology.
    pub(crate) fn from_index(index: usize) -> Self {
        NodeId(index)
    }

    /// The node's position in the configuration (and its slot in the control region).
    pub fn index(self) -> usize {
        self.0
    }

    /// The identity at home on this node.
    pub fn home_identity(self) -> IdentityId {
        IdentityId(self.0)
    }
}

impl IdentityId {
    /// The identity's position in the configuration (and its slot in the control region).
    pub fn index(self) -> usize {
        self.0
    }

    /// The node this identity is at home on.
    pub fn home(self) -> NodeId {
        NodeId(self.0)
    }
}

/// The cluster's membership and takeover order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    names: Vec<String>,
}

impl Topology {
    /// A cluster of the named nodes, in configuration order.
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        Self {
            names: names.into_iter().collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn nodes(&self) -> impl Iterator<Item = NodeId> + use<> {
        (0..self.names.len()).map(NodeId)
    }

    pub fn identities(&self) -> impl Iterator<Item = IdentityId> + use<> {
        (0..self.names.len()).map(IdentityId)
    }

    pub fn name(&self, node: NodeId) -> &str {
        &self.names[node.0]
    }

    /// An identity is named after its home node.
    pub fn identity_name(&self, identity: IdentityId) -> &str {
        &self.names[identity.0]
    }

    pub fn node_named(&self, name: &str) -> Option<NodeId> {
        self.names.iter().position(|n| n == name).map(NodeId)
    }

    /// The node in a control-region slot, if the slot names one of this cluster's nodes.
    pub fn node_at(&self, index: usize) -> Option<NodeId> {
        (index < self.names.len()).then_some(NodeId(index))
    }

    /// The nodes that may take `identity` over, most preferred first: the other nodes in
    /// ring order after its home node.
    pub fn takeover_candidates(
        &self,
        identity: IdentityId,
    ) -> impl Iterator<Item = NodeId> + use<> {
        let n = self.names.len();
        (1..n).map(move |step| NodeId((identity.0 + step) % n))
    }

    /// The first node that may take `identity` over: the partner its home node shows.
    pub fn first_taker(&self, identity: IdentityId) -> Option<NodeId> {
        self.takeover_candidates(identity).next()
    }

    /// The nodes whose regions and disks `node` needs, to take their identities over.
    pub fn watched_by(&self, node: NodeId) -> Vec<NodeId> {
        self.identities()
            .filter(|&identity| self.takeover_candidates(identity).any(|n| n == node))
            .map(IdentityId::home)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(n: usize) -> Topology {
        Topology::new((0..n).map(|i| format!("n{i}")))
    }

    #[test]
    fn a_pair_takes_each_other_over() {
        let pair = Topology::new(["a".to_owned(), "b".to_owned()]);
        let a = pair.node_named("a").unwrap();
        let b = pair.node_named("b").unwrap();
        assert_eq!(pair.first_taker(a.home_identity()), Some(b));
        assert_eq!(pair.first_taker(b.home_identity()), Some(a));
        assert_eq!(pair.watched_by(a), [b]);
        assert_eq!(pair.identity_name(b.home_identity()), "b");
        assert_eq!(pair.node_at(2), None);
    }

    #[test]
    fn candidates_follow_the_ring_and_never_name_the_home_node() {
        let four = cluster(4);
        for identity in four.identities() {
            let candidates: Vec<NodeId> = four.takeover_candidates(identity).collect();
            assert_eq!(candidates.len(), 3);
            assert!(!candidates.contains(&identity.home()));
            assert_eq!(candidates[0].index(), (identity.index() + 1) % 4);
        }
        // Every other node watches every node.
        assert_eq!(four.watched_by(NodeId(0)).len(), 3);
        assert!(cluster(1).first_taker(IdentityId(0)).is_none());
    }
}
