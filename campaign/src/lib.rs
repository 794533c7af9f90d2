//! The fault campaign: many randomized faults against a live pair while clients write, and a
//! checker that proves from the recorded history that nothing acknowledged was lost.

pub mod attribution;
pub mod block;
pub mod checker;
pub mod client_vm;
pub mod history;
pub mod hostd;
pub mod measure;
pub mod nbd_client;
pub mod nemesis;
pub mod plots;
pub mod probe;
pub mod progress;
pub mod regions;
pub mod report;
pub mod rng;
pub mod run;
pub mod sampler;
pub mod torn_tail;
pub mod workload;
