//! `ivha-campaign`: run a fault campaign, or check a recorded history.

fn main() {}
