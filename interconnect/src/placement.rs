//! Which links channels may travel on, and which one each channel takes.
//!
//! A link is *in service* while it is up. It leaves service as soon as it is not (degraded
//! or down), and channels leave with it. It enters service when it goes up for the first
//! time, when no link is in service (nothing better to wait for), or once it has settled
//! after coming back ([`Link::settled`]): that is the hysteresis, so a link that flaps does
//! not pull channels back each time it answers. With no link in service, channels use the
//! degraded links.
//!
//! By class: bulk channels are spread over the links in use that take bulk (the first to
//! the first, the second to the second, ...), so two bulk clients get two links; control
//! channels take the link that carries the fewest bulk channels (of those that take bulk:
//! the fast ones; the later one on a tie), so no control message waits behind a bulk
//! transfer while a link without one exists; with one link, all share it.

use crate::link::{Link, LinkState};
use crate::manager::Class;

/// The links in service.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    in_service: Vec<bool>,
    /// Links that may carry bulk while another can.
    bulk_allowed: Vec<bool>,
}

impl Placement {
    pub(crate) fn new(links: usize) -> Self {
        Self {
            in_service: vec![false; links],
            bulk_allowed: vec![true; links],
        }
    }

    pub(crate) fn set_bulk_allowed(&mut self, link: usize, allowed: bool) {
        if let Some(slot) = self.bulk_allowed.get_mut(link) {
            *slot = allowed;
        }
    }

    /// The link of each channel (in order, placed as `classes`) among `usable`.
    pub(crate) fn assign(&self, usable: &[usize], classes: &[Class]) -> Vec<Option<usize>> {
        let fast: Vec<usize> = usable
            .iter()
            .copied()
            .filter(|&l| self.bulk_allowed.get(l).copied().unwrap_or(true))
            .collect();
        let fast = if fast.is_empty() {
            usable.to_vec()
        } else {
            fast
        };
        let mut bulk_on = vec![0usize; self.in_service.len()];
        let mut bulk_seen = 0;
        let mut targets: Vec<Option<usize>> = classes
            .iter()
            .map(|class| {
                (*class == Class::Bulk && !fast.is_empty()).then(|| {
                    let link = fast[bulk_seen % fast.len()];
                    bulk_seen += 1;
                    if let Some(count) = bulk_on.get_mut(link) {
                        *count += 1;
                    }
                    link
                })
            })
            .collect();
        // Control: the fast link with the fewest bulk channels, the later one on a tie.
        let control = match usable {
            [] => None,
            [only] => Some(*only),
            _ => fast
                .iter()
                .copied()
                .min_by_key(|&l| (bulk_on.get(l).copied().unwrap_or(0), std::cmp::Reverse(l))),
        };
        for (target, class) in targets.iter_mut().zip(classes) {
            if *class == Class::Control {
                *target = control;
            }
        }
        targets
    }

    /// Takes links out of service and into it by their states now; returns the links
    /// channels may use, in order.
    pub(crate) fn usable(&mut self, links: &[Link]) -> Vec<usize> {
        for (serving, link) in self.in_service.iter_mut().zip(links) {
            *serving &= link.state() == LinkState::Up;
        }
        let none_in_service = !self.in_service.contains(&true);
        for (serving, link) in self.in_service.iter_mut().zip(links) {
            if link.state() == LinkState::Up && (none_in_service || link.settled()) {
                *serving = true;
            }
        }
        let serving: Vec<usize> = (0..links.len()).filter(|&l| self.in_service[l]).collect();
        if serving.is_empty() {
            (0..links.len()).filter(|&l| links[l].usable()).collect()
        } else {
            serving
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::LinkConfig;
    use std::time::{Duration, Instant};

    #[test]
    fn a_returning_link_waits_to_settle_unless_nothing_else_serves() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let config = LinkConfig {
            heartbeat: ms(10),
            ..LinkConfig::default()
        };
        let mut links = vec![Link::new(0, config), Link::new(1, config)];
        let mut placement = Placement::new(2);
        assert!(placement.usable(&links).is_empty());
        links[0].heard(start);
        links[1].heard(start);
        assert_eq!(placement.usable(&links), vec![0, 1], "first up: at once");
        // Link 1 goes silent and down, link 0 keeps hearing the peer.
        for at in [10, 20, 30] {
            links[0].heard(start + ms(at));
            links[0].tick(start + ms(at));
            links[1].tick(start + ms(at));
        }
        assert_eq!(links[1].state(), LinkState::Down);
        assert_eq!(placement.usable(&links), vec![0]);
        links[1].heard(start + ms(31));
        assert_eq!(placement.usable(&links), vec![0], "back, not settled");
        links[1].heard(start + ms(61));
        assert_eq!(placement.usable(&links), vec![0, 1], "settled");
        // Link 0 degrades while link 1 is back but unsettled: link 1 serves at once.
        let mut links = vec![Link::new(0, config), Link::new(1, config)];
        let mut placement = Placement::new(2);
        links[0].heard(start);
        links[1].heard(start);
        assert_eq!(placement.usable(&links), vec![0, 1]);
        links[1].tick(start + ms(30));
        assert_eq!(placement.usable(&links), vec![0]);
        links[1].heard(start + ms(31));
        links[0].tick(start + ms(31));
        assert_eq!(links[0].state(), LinkState::Down);
        assert_eq!(placement.usable(&links), vec![1]);
    }

    #[test]
    fn bulk_spreads_over_the_fast_links_and_control_takes_the_least_loaded() {
        use Class::{Bulk, Control};
        let mut placement = Placement::new(3);
        assert_eq!(placement.assign(&[], &[Bulk, Control]), vec![None, None]);
        assert_eq!(
            placement.assign(&[2], &[Bulk, Control]),
            vec![Some(2), Some(2)],
            "one link: all share it"
        );
        assert_eq!(
            placement.assign(&[0, 1], &[Control, Bulk]),
            vec![Some(1), Some(0)],
            "bulk first, control second"
        );
        assert_eq!(
            placement.assign(&[0, 1], &[Control]),
            vec![Some(1)],
            "no bulk: control keeps the second link"
        );
        assert_eq!(
            placement.assign(&[0, 1], &[Bulk, Bulk, Control]),
            vec![Some(0), Some(1), Some(1)],
            "two bulk channels, two links"
        );
        // The mailbox (link 2) takes no bulk while a network link can.
        placement.set_bulk_allowed(2, false);
        assert_eq!(
            placement.assign(&[0, 1, 2], &[Bulk, Bulk, Control]),
            vec![Some(0), Some(1), Some(1)]
        );
        assert_eq!(
            placement.assign(&[0, 2], &[Bulk, Control]),
            vec![Some(0), Some(0)],
            "control stays on a fast link, beside bulk"
        );
        assert_eq!(
            placement.assign(&[2], &[Bulk, Control]),
            vec![Some(2), Some(2)],
            "the mailbox alone carries everything"
        );
    }
}
