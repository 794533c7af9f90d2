# Sourced after `cd` to the repository root: cargo's target directory, absolute
# (CARGO_TARGET_DIR when set, as cargo itself reads it; else target/ here).
target_dir=$(realpath -m "${CARGO_TARGET_DIR:-target}")
