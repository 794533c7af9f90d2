//! The fault campaign: many randomized faults against a live pair while clients write, and a
//! checker that proves from the recorded history that nothing acknowledged was lost.

pub mod nbd_client;
