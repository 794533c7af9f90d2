//! QEMU integration for ivha.
//!
//! - [`cmdline`]: builds `qemu-system-x86_64` command lines ([`QemuCommand`]).
//! - [`qmp`]: a QMP client with commands and events ([`QmpClient`]).
//! - [`child`]: a child process owned through a pidfd, killed on drop ([`QemuChild`]).
//! - [`accel`]: chooses KVM or TCG ([`detect`]).
//! - [`launch`](mod@launch): starts QEMU and connects to QMP, with QEMU's own words on failure.

pub mod accel;
pub mod child;
pub mod cmdline;
pub mod image;
pub mod launch;
pub mod qmp;
#[cfg(test)]
mod test_support;

pub use accel::{Accel, AccelChoice, AccelError, detect};
pub use child::{
    ChildError, Exit, QemuChild, Signal, process_start_time, process_state,
    process_state_and_start_time, thread_states,
};
pub use cmdline::{CmdlineError, HostForward, PanicAction, QemuCommand};
pub use launch::{LaunchError, connect_qmp, launch};
pub use qmp::{QmpClient, QmpError, QmpEvent};
