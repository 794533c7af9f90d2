//! The sampler: a thread that reads the cluster's regions every [`INTERVAL`] and records
//! into the history what changed: hostd's owner records (`owner`), the agents' claims
//! (`claim`) and ejections (`ejected`). The checker judges ownership from them, so it does
//! not rely on hostd's word alone: while hostd is away only the regions say who owns what.
//!
//! Each entry carries `t`, the end of the read that first saw it (it was published by
//! then), and `since`, the start of the read before (it was not published yet then): the
//! publication lies in between. Changes read at one go share their times.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::history::{ClaimSeen, EjectionSeen, Entry, HistoryWriter, OwnerSeen};
use crate::regions::{ClusterRegions, Snapshot};

/// How often the regions are read. Every owner change hostd makes waits for at least one
/// acknowledgement from an agent, so none stands for less than this and goes unseen.
pub const INTERVAL: Duration = Duration::from_millis(20);
/// Every how many reads the region files are looked at (replaced files mapped again).
const CHECK_FILES_EVERY: u64 = 25;

/// The running sampler.
#[derive(Debug)]
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    /// Starts reading the regions of the cluster in `state_dir` into `history`.
    pub fn start(state_dir: &Path, history: Arc<HistoryWriter>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut regions = ClusterRegions::new(state_dir);
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sampler".into())
            .spawn(move || sample(&mut regions, &history, &stopping))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the sampler after a last read, and waits for it.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn sample(regions: &mut ClusterRegions, history: &HistoryWriter, stop: &AtomicBool) {
    let mut previous: Option<(u64, Snapshot)> = None;
    let mut reads = 0u64;
    let mut warned = false;
    loop {
        // The last read comes after the stop was asked: nothing published before is missed.
        let last = stop.load(Ordering::Relaxed);
        let before = wire::time::now_unix_us();
        match regions.snapshot(reads % CHECK_FILES_EVERY == 0) {
            Ok(snapshot) => {
                let t = wire::time::now_unix_us();
                let prior = previous.as_ref().map(|(since, seen)| (*since, seen));
                for entry in changes(prior, &snapshot, t) {
                    if let Err(error) = history.append(&entry) {
                        log::error!("cannot record {entry:?}: {error}");
                    }
                }
                previous = Some((before, snapshot));
                warned = false;
            }
            Err(error) if !warned => {
                log::warn!(
                    "the sampler cannot read the regions: {}",
                    wire::error_chain::one_line(&error)
                );
                warned = true;
            }
            Err(_) => {}
        }
        reads += 1;
        if last {
            return;
        }
        std::thread::sleep(INTERVAL);
    }
}

/// The entries for what `now` (read by `t`) shows that `previous` (read from `since` on)
/// did not; everything, with no `since`, if there is no previous read.
pub fn changes(previous: Option<(u64, &Snapshot)>, now: &Snapshot, t: u64) -> Vec<Entry> {
    let since = previous.map(|(since, _)| since);
    let before = previous.map(|(_, seen)| seen);
    let name = |id: u32| now.node_name(id).map(str::to_owned);
    let mut entries = Vec::new();
    for (index, identity) in now.identities.iter().enumerate() {
        let Some(owner) = now.recorded.get(index).copied().flatten() else {
            continue;
        };
        let was = before.and_then(|b| b.recorded.get(index).copied().flatten());
        if was != Some(owner) {
            entries.push(Entry::Owner(OwnerSeen {
                t,
                since: since.filter(|_| was.is_some()),
                identity: identity.clone(),
                node: owner.node.and_then(name),
                epoch: owner.epoch,
            }));
        }
    }
    // A node's boot id, when the same at both reads (else which life wrote is unknown).
    let stable_boot = |node: usize| {
        let now = now.regions.get(node)?.as_ref()?.boot_id;
        let then = before?.regions.get(node)?.as_ref()?.boot_id;
        (now == then).then_some(now)
    };
    for (node_index, (node, region)) in now.nodes.iter().zip(&now.regions).enumerate() {
        let Some(region) = region else { continue };
        // A region not read before: what it shows may be older than the previous read.
        let region_before = before.and_then(|b| b.regions.get(node_index)?.as_ref());
        let since = since.filter(|_| region_before.is_some());
        for (identity_index, identity) in now.identities.iter().enumerate() {
            let Some(claim) = region.claims.get(identity_index).copied().flatten() else {
                continue;
            };
            let was = region_before.and_then(|r| r.claims.get(identity_index).copied().flatten());
            if was == Some(claim) {
                continue;
            }
            entries.push(Entry::Claim(ClaimSeen {
                t,
                since,
                node: node.clone(),
                identity: identity.clone(),
                generation: claim.generation,
                victim: name(claim.victim).unwrap_or_else(|| format!("node {}", claim.victim)),
                boot_id: stable_boot(node_index),
                victim_boot_id: stable_boot(claim.victim as usize),
            }));
        }
        if let Some(ejection) = region.ejected
            && region_before.and_then(|r| r.ejected) != Some(ejection)
        {
            entries.push(Entry::Ejected(EjectionSeen {
                t,
                since,
                node: node.clone(),
                generation: ejection.generation,
                reason: reason_name(ejection.reason),
                boot_id: stable_boot(node_index),
            }));
        }
    }
    entries
}

/// The reason's name, as in JSON.
fn reason_name(reason: shm::EjectReason) -> String {
    match reason {
        shm::EjectReason::NotMember => "not_member".into(),
        shm::EjectReason::Claimed => "claimed".into(),
        shm::EjectReason::Unknown(word) => format!("unknown_{word}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::regions::RegionState;
    use shm::{Claim, EjectReason, Ejection, Owner};

    fn snapshot() -> Snapshot {
        let owner = |node| {
            Some(Owner {
                node: Some(node),
                epoch: 0,
            })
        };
        let region = |boot_id| {
            Some(RegionState {
                boot_id,
                claims: vec![None, None],
                ejected: None,
            })
        };
        Snapshot {
            nodes: vec!["a".into(), "b".into()],
            identities: vec!["a".into(), "b".into()],
            recorded: vec![owner(0), owner(1)],
            newest: vec![owner(0), owner(1)],
            regions: vec![region(10), region(20)],
            presence: None,
        }
    }

    #[test]
    fn the_first_read_records_everything_then_only_changes() {
        let first = snapshot();
        let entries = changes(None, &first, 100);
        assert_eq!(entries.len(), 2);
        assert!(
            matches!(&entries[0], Entry::Owner(o) if o.since.is_none() && o.t == 100 && o.node.as_deref() == Some("a"))
        );
        assert!(changes(Some((100, &first)), &first, 200).is_empty());

        let mut next = first.clone();
        let claim = Claim {
            generation: 4,
            victim: 0,
        };
        if let Some(b) = next.regions[1].as_mut() {
            b.claims[0] = Some(claim);
        }
        if let Some(a) = next.regions[0].as_mut() {
            a.boot_id = 11;
            a.ejected = Some(Ejection {
                generation: 4,
                reason: EjectReason::NotMember,
                unix_ns: 5,
            });
        }
        next.recorded[0] = Some(Owner {
            node: Some(1),
            epoch: 4,
        });
        let entries = changes(Some((150, &first)), &next, 300);
        assert_eq!(entries.len(), 3, "{entries:?}");
        let Entry::Owner(owner) = &entries[0] else {
            panic!("{entries:?}")
        };
        assert_eq!(
            (owner.since, owner.t, owner.node.as_deref(), owner.epoch),
            (Some(150), 300, Some("b"), 4)
        );
        let Entry::Ejected(ejected) = &entries[1] else {
            panic!("{entries:?}")
        };
        assert_eq!(ejected.node, "a");
        assert_eq!(ejected.reason, "not_member");
        // a restarted between the reads: which life ejected is not known.
        assert_eq!(ejected.boot_id, None);
        let Entry::Claim(seen) = &entries[2] else {
            panic!("{entries:?}")
        };
        assert_eq!(
            (
                seen.node.as_str(),
                seen.identity.as_str(),
                seen.victim.as_str()
            ),
            ("b", "a", "a")
        );
        assert_eq!((seen.generation, seen.since, seen.t), (4, Some(150), 300));
        assert_eq!((seen.boot_id, seen.victim_boot_id), (Some(20), None));
    }

    #[test]
    fn a_region_read_for_the_first_time_has_no_since() {
        let mut first = snapshot();
        first.regions[1] = None;
        let mut next = snapshot();
        if let Some(b) = next.regions[1].as_mut() {
            b.claims[0] = Some(Claim {
                generation: 2,
                victim: 0,
            });
        }
        let entries = changes(Some((150, &first)), &next, 300);
        assert!(
            matches!(&entries[..], [Entry::Claim(c)] if c.since.is_none() && c.boot_id.is_none() && c.victim_boot_id == Some(10)),
            "{entries:?}"
        );
    }
}
