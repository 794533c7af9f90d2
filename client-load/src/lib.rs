//! The client VM's workload (`ivha-client-load`) and the line protocol it shares with the
//! host (`record`), which reads its reports and checks the filesystem afterwards.

pub mod content;
pub mod control;
pub mod options;
pub mod record;
pub mod workload;
