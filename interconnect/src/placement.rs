//! Which links channels may travel on, and which one each channel takes.
//!
//! A link is *in service* while it is up. It leaves service as soon as it is not (degraded
//! or down), and channels leave with it. It enters service when it goes up for the first
//! time, when no link is in service (nothing better to wait for), or once it has settled
//! after coming back ([`Link::settled`]): that is the hysteresis, so a link that flaps does
//! not pull channels back each time it answers. With no link in service, channels use the
//! degraded links.
//!
//! By class: bulk channels take the first link of those in use, control channels the
//! second, so no control message waits behind a bulk transfer; with one link, all share it.

use crate::link::{Link, LinkState};
use crate::manager::Class;

/// The links in service.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    in_service: Vec<bool>,
}

impl Placement {
    pub(crate) fn new(links: usize) -> Self {
        Self {
            in_service: vec![false; links],
        }
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

    /// The link a channel placed as `class` takes among `usable`.
    pub(crate) fn target(usable: &[usize], class: Class) -> Option<usize> {
        match (usable, class) {
            ([], _) => None,
            ([only], _) | ([only, ..], Class::Bulk) => Some(*only),
            ([_, second, ..], Class::Control) => Some(*second),
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
    fn bulk_takes_the_first_link_and_control_the_second() {
        assert_eq!(Placement::target(&[], Class::Bulk), None);
        assert_eq!(Placement::target(&[2], Class::Control), Some(2));
        assert_eq!(Placement::target(&[0, 1], Class::Bulk), Some(0));
        assert_eq!(Placement::target(&[0, 1, 2], Class::Control), Some(1));
    }
}
