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
    /// Per node, the nodes that may take its identity over, most preferred first.
    takers: Vec<Vec<NodeId>>,
}

/// The other nodes of a cluster of `count` in ring order after node `index`: the default
/// takeover order (for 3 nodes: 0 → 1, 2; 1 → 2, 0; 2 → 0, 1).
pub fn ring_after(index: usize, count: usize) -> Vec<usize> {
    (1..count).map(|step| (index + step) % count).collect()
}

impl Topology {
    /// A cluster of the named nodes, in configuration order, each taken over by the other
    /// nodes in ring order after it.
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        let names: Vec<String> = names.into_iter().collect();
        let count = names.len();
        let order = (0..count).map(|index| ring_after(index, count)).collect();
        Self::with_takeover_order(names, order)
    }

    /// A cluster of the named nodes with, per node, the positions of the nodes that may
    /// take its identity over, most preferred first (`Config::takeover_order`). Positions
    /// that are not another node of the cluster are left out (a validated configuration
    /// has none); a node without a list gets the ring order.
    pub fn with_takeover_order(
        names: impl IntoIterator<Item = String>,
        order: Vec<Vec<usize>>,
    ) -> Self {
        let names: Vec<String> = names.into_iter().collect();
        let count = names.len();
        let takers = (0..count)
            .map(|node| {
                let list = order
                    .get(node)
                    .cloned()
                    .unwrap_or_else(|| ring_after(node, count));
                list.into_iter()
                    .filter(|&taker| {
                        let valid = taker < count && taker != node;
                        if !valid {
                            log::error!("node {node}: ignoring taker {taker}, not another node");
                        }
                        valid
                    })
                    .map(NodeId)
                    .collect()
            })
            .collect();
        Self { names, takers }
    }

    /// The cluster a (validated) configuration describes.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self::with_takeover_order(
            config.nodes.iter().map(|n| n.name.clone()),
            config.takeover_order(),
        )
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

    /// `node`'s takeover list (its `takeover_by`): the nodes that take over whatever
    /// `node` holds when it dies, most preferred first.
    pub fn takeover_by(&self, node: NodeId) -> &[NodeId] {
        &self.takers[node.0]
    }

    /// The nodes that may take `identity` over from its home node, most preferred first:
    /// the home node's takeover list.
    pub fn takeover_candidates(
        &self,
        identity: IdentityId,
    ) -> impl Iterator<Item = NodeId> + use<> {
        self.takers[identity.0].clone().into_iter()
    }

    /// The first node that may take `identity` over from its home node.
    pub fn first_taker(&self, identity: IdentityId) -> Option<NodeId> {
        self.takers[identity.0].first().copied()
    }

    /// Who takes an identity over when its current `holder` dies: the first node of the
    /// holder's takeover list that `usable` accepts (hostd takes the first live one), or
    /// the list's first node when none is.
    pub fn next_taker(&self, holder: NodeId, usable: impl Fn(NodeId) -> bool) -> Option<NodeId> {
        let list = self.takeover_by(holder);
        list.iter()
            .copied()
            .find(|&node| usable(node))
            .or_else(|| list.first().copied())
    }

    /// Every node that may come to hold `identity`, in configuration order: its home node
    /// and, over and over, any node in the takeover list of a node that may hold it (a
    /// taker that dies hands on everything it holds).
    pub fn may_hold(&self, identity: IdentityId) -> Vec<NodeId> {
        let mut holds = vec![false; self.names.len()];
        holds[identity.0] = true;
        let mut todo = vec![identity.home()];
        while let Some(holder) = todo.pop() {
            for &taker in self.takeover_by(holder) {
                if !holds[taker.0] {
                    holds[taker.0] = true;
                    todo.push(taker);
                }
            }
        }
        self.nodes().filter(|node| holds[node.0]).collect()
    }

    /// The nodes whose regions and disks `node` needs, in configuration order: for every
    /// identity `node` may come to hold (its own included), every other node that may
    /// hold it: the identity's home node (its disk, and its log after a failure) and the
    /// takers before `node` (a dead taker's log holds the identity's newest records; a
    /// giveback from a dead taker replays it too).
    pub fn watched_by(&self, node: NodeId) -> Vec<NodeId> {
        let mut watched = vec![false; self.names.len()];
        for identity in self.identities() {
            let holders = self.may_hold(identity);
            if holders.contains(&node) {
                for holder in holders {
                    watched[holder.0] = true;
                }
            }
        }
        watched[node.0] = false;
        self.nodes().filter(|other| watched[other.0]).collect()
    }
}

impl Topology {
    /// The nodes `node` has interconnect links to: those it watches and those watching it
    /// (links are two-way, so both ends must have them).
    pub fn interconnect_peers(&self, node: NodeId) -> Vec<NodeId> {
        let watched = self.watched_by(node);
        self.nodes()
            .filter(|&other| {
                other != node
                    && (watched.contains(&other) || self.watched_by(other).contains(&node))
            })
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

    fn ids(indexes: &[usize]) -> Vec<NodeId> {
        indexes.iter().copied().map(NodeId).collect()
    }

    fn custom(order: &[&[usize]]) -> Topology {
        Topology::with_takeover_order(
            (0..order.len()).map(|i| format!("n{i}")),
            order.iter().map(|list| list.to_vec()).collect(),
        )
    }

    #[test]
    fn the_default_ring_for_2_3_and_4_nodes() {
        let pair = cluster(2);
        assert_eq!(pair.takeover_by(NodeId(0)), ids(&[1]));
        assert_eq!(pair.takeover_by(NodeId(1)), ids(&[0]));
        assert_eq!(pair.watched_by(NodeId(1)), ids(&[0]));

        let three = cluster(3);
        assert_eq!(three.takeover_by(NodeId(0)), ids(&[1, 2]));
        assert_eq!(three.takeover_by(NodeId(1)), ids(&[2, 0]));
        assert_eq!(three.takeover_by(NodeId(2)), ids(&[0, 1]));
        for node in three.nodes() {
            let others: Vec<NodeId> = three.nodes().filter(|&n| n != node).collect();
            assert_eq!(three.watched_by(node), others);
        }
        assert_eq!(three.may_hold(IdentityId(2)), ids(&[0, 1, 2]));

        let four = cluster(4);
        assert_eq!(four.takeover_by(NodeId(2)), ids(&[3, 0, 1]));
        assert_eq!(four.watched_by(NodeId(3)), ids(&[0, 1, 2]));
        assert_eq!(
            four.takeover_candidates(IdentityId(3)).collect::<Vec<_>>(),
            ids(&[0, 1, 2])
        );
        // The configuration's default is this ring.
        assert_eq!(ring_after(3, 4), [0, 1, 2]);
    }

    #[test]
    fn the_next_taker_is_the_first_usable_node_of_the_holder_s_list() {
        let three = cluster(3);
        // n0 holds its own identity: n1 takes it, or n2 when n1 is dead.
        assert_eq!(three.next_taker(NodeId(0), |_| true), Some(NodeId(1)));
        assert_eq!(
            three.next_taker(NodeId(0), |n| n != NodeId(1)),
            Some(NodeId(2))
        );
        // n1 holds n0's identity: n1's list decides (n2, then n0, its home).
        assert_eq!(three.next_taker(NodeId(1), |_| true), Some(NodeId(2)));
        assert_eq!(
            three.next_taker(NodeId(1), |n| n == NodeId(0)),
            Some(NodeId(0))
        );
        // None usable: the first of the list, for the status to name.
        assert_eq!(three.next_taker(NodeId(2), |_| false), Some(NodeId(0)));
        assert_eq!(cluster(1).next_taker(NodeId(0), |_| true), None);
    }

    #[test]
    fn watching_follows_custom_lists_transitively() {
        // n0 → [n1], n1 → [n2], n2 → [n1], n3 → [n0].
        let four = custom(&[&[1], &[2], &[1], &[0]]);
        assert_eq!(four.first_taker(IdentityId(3)), Some(NodeId(0)));
        // n3's identity may go to n0, then n1 (n0's taker), then n2 (n1's taker).
        assert_eq!(four.may_hold(IdentityId(3)), ids(&[0, 1, 2, 3]));
        assert_eq!(four.may_hold(IdentityId(0)), ids(&[0, 1, 2]));
        assert_eq!(four.may_hold(IdentityId(1)), ids(&[1, 2]));
        assert_eq!(four.may_hold(IdentityId(2)), ids(&[1, 2]));
        // n2 may hold every identity: it needs every other region, n3's included (home of
        // an identity it may hold) and n0's (a taker of n3's before it).
        assert_eq!(four.watched_by(NodeId(2)), ids(&[0, 1, 3]));
        // n0 may hold n3's and its own: n3 is home to one, n1 and n2 may hold both.
        assert_eq!(four.watched_by(NodeId(0)), ids(&[1, 2, 3]));
        assert_eq!(four.watched_by(NodeId(1)), ids(&[0, 2, 3]));
        // n3 takes nothing over, but a giveback of its identity may find it with any of
        // the others.
        assert_eq!(four.watched_by(NodeId(3)), ids(&[0, 1, 2]));

        // A pair inside a cluster: n0 and n1 take each other over, n2 goes to n0 only.
        let three = custom(&[&[1], &[0], &[0]]);
        assert_eq!(three.may_hold(IdentityId(2)), ids(&[0, 1, 2]));
        assert_eq!(three.watched_by(NodeId(0)), ids(&[1, 2]));
        assert_eq!(three.watched_by(NodeId(1)), ids(&[0, 2]));
        // Two disjoint pairs watch only each other.
        let pairs = custom(&[&[1], &[0], &[3], &[2]]);
        assert_eq!(pairs.watched_by(NodeId(0)), ids(&[1]));
        assert_eq!(pairs.watched_by(NodeId(3)), ids(&[2]));
    }

    /// While hostd is away an agent sees a peer's claim only in the peer's region: every
    /// node that may claim an identity a node may hold (its takers, their takers, and so
    /// on) must be among the regions the node maps, or it could serve an identity claimed
    /// from under it.
    #[test]
    fn a_node_maps_every_node_that_may_claim_what_it_may_hold() {
        let topologies = [
            cluster(2),
            cluster(3),
            cluster(5),
            custom(&[&[1], &[2], &[1], &[0]]),
            custom(&[&[1], &[0], &[0]]),
            custom(&[&[1], &[0], &[3], &[2]]),
            custom(&[&[3], &[0], &[1], &[2]]),
        ];
        for topology in &topologies {
            for node in topology.nodes() {
                let mapped = topology.watched_by(node);
                for identity in topology.identities() {
                    let holders = topology.may_hold(identity);
                    if !holders.contains(&node) {
                        continue;
                    }
                    // Any holder may lose it to a claim by a node of its list: those are
                    // holders too.
                    for claimer in holders.iter().flat_map(|&h| topology.takeover_by(h)) {
                        assert!(
                            *claimer == node || mapped.contains(claimer),
                            "{topology:?}: node {node:?} may hold {identity:?}, which {claimer:?} may claim, but maps only {mapped:?}"
                        );
                    }
                }
            }
        }
        // The ring of four sends n0's identity along n3 → n2 → n1: n0 maps them all.
        let ring = custom(&[&[3], &[0], &[1], &[2]]);
        assert_eq!(ring.watched_by(NodeId(0)), ids(&[1, 2, 3]));
    }

    /// The configuration refuses such lists; a saved one that was damaged does not panic
    /// hostd: the node itself and unknown positions are left out.
    #[test]
    fn a_list_naming_the_node_itself_or_no_node_is_cut() {
        let pair = custom(&[&[0, 1, 7], &[0]]);
        assert_eq!(pair.takeover_by(NodeId(0)), [NodeId(1)]);
        assert_eq!(pair.takeover_by(NodeId(1)), [NodeId(0)]);
    }
}
