//! QEMU integration for ivha.
//!
//! Scope: the command-line builder, the QMP client, the child handle with its pidfd and
//! accelerator detection. It arrives with the paired-guests issue.
