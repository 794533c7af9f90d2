//! Chooses between KVM and TCG.
//!
//! `/dev/kvm` existing, and even QEMU's `query-kvm` answering "enabled", is not enough: on
//! a host whose CPU lacks vmx/svm (nested setups without virtualization passthrough) the
//! KVM module can load and QEMU starts, but the guest hangs at "Booting from ROM". So KVM
//! is chosen only when the CPU flags show vmx or svm, `/dev/kvm` opens read-write, and a
//! real QEMU probe reports KVM present and enabled. Anything else means TCG, with the
//! reason. `IVHA_ACCEL=kvm|tcg` overrides detection.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::child::QemuChild;
use crate::qmp::QmpClient;

/// The environment variable that forces the accelerator: `kvm` or `tcg`.
pub const ACCEL_ENV: &str = "IVHA_ACCEL";

/// How long [`detect`] lets the QEMU probe run before killing it.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// A QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulator (multi-threaded TCG).
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The chosen accelerator and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    /// The accelerator to use.
    pub accel: Accel,
    /// Why, in words: e.g. "CPU has no vmx/svm flag".
    pub reason: String,
}

/// Why accelerator detection could not decide.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    /// `IVHA_ACCEL` holds something other than `kvm` or `tcg`.
    #[error("{ACCEL_ENV} must be `kvm` or `tcg`, not `{0}`")]
    InvalidOverride(String),
    /// The QEMU probe could not confirm KVM (returned by [`probe_kvm`] only).
    #[error("KVM probe failed: {0}")]
    Probe(String),
}

/// Decides between KVM and TCG for the QEMU at `binary`, honouring `IVHA_ACCEL`.
///
/// Fails only for an invalid `IVHA_ACCEL`; every obstacle to KVM yields TCG with a reason.
/// May run `binary` for up to [`PROBE_TIMEOUT`].
pub fn detect(binary: &Path) -> Result<AccelChoice, AccelError> {
    let env = std::env::var_os(ACCEL_ENV);
    if let Some(accel) = parse_override(env.as_deref())? {
        return Ok(AccelChoice {
            accel,
            reason: format!("{ACCEL_ENV}={accel} overrides detection"),
        });
    }
    Ok(detect_host(
        binary,
        Path::new("/proc/cpuinfo"),
        Path::new("/dev/kvm"),
        PROBE_TIMEOUT,
    ))
}

/// Parses the value of `IVHA_ACCEL`: unset or empty means no override.
pub fn parse_override(value: Option<&OsStr>) -> Result<Option<Accel>, AccelError> {
    let Some(value) = value else {
        return Ok(None);
    };
    match value.to_str().map(str::trim) {
        Some("") => Ok(None),
        Some(v) if v.eq_ignore_ascii_case("kvm") => Ok(Some(Accel::Kvm)),
        Some(v) if v.eq_ignore_ascii_case("tcg") => Ok(Some(Accel::Tcg)),
        _ => Err(AccelError::InvalidOverride(
            value.to_string_lossy().into_owned(),
        )),
    }
}

/// The virtualization flag (`vmx` for Intel VT-x, `svm` for AMD-V) found on a `flags`
/// line of `/proc/cpuinfo` text, if any.
pub fn cpu_virt_flag(cpuinfo: &str) -> Option<&'static str> {
    for line in cpuinfo.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if key.trim() != "flags" {
            continue;
        }
        for flag in value.split_whitespace() {
            match flag {
                "vmx" => return Some("vmx"),
                "svm" => return Some("svm"),
                _ => {}
            }
        }
    }
    None
}

fn tcg(reason: String) -> AccelChoice {
    log::info!("using TCG: {reason}");
    AccelChoice {
        accel: Accel::Tcg,
        reason,
    }
}

fn detect_host(binary: &Path, cpuinfo: &Path, kvm_dev: &Path, timeout: Duration) -> AccelChoice {
    let flag = match std::fs::read_to_string(cpuinfo) {
        Ok(text) => match cpu_virt_flag(&text) {
            Some(flag) => flag,
            None => return tcg("CPU has no vmx/svm flag".to_owned()),
        },
        Err(e) => return tcg(format!("cannot read {}: {e}", cpuinfo.display())),
    };
    if let Err(e) = OpenOptions::new().read(true).write(true).open(kvm_dev) {
        let why = match e.kind() {
            std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
            std::io::ErrorKind::NotFound => "not present".to_owned(),
            _ => e.to_string(),
        };
        return tcg(format!("{}: {why}", kvm_dev.display()));
    }
    match probe_kvm(binary, timeout) {
        Ok(()) => {
            let reason = format!(
                "CPU has {flag}, {} is usable and QEMU reports KVM enabled",
                kvm_dev.display()
            );
            log::info!("using KVM: {reason}");
            AccelChoice {
                accel: Accel::Kvm,
                reason,
            }
        }
        Err(e) => tcg(e.to_string()),
    }
}

/// Starts `binary` with `-machine none -accel kvm -qmp stdio`, asks `query-kvm`, and
/// succeeds only if KVM is both present and enabled. The process is killed if it has not
/// finished within `timeout`. The error describes what went wrong, with QEMU's stderr.
pub fn probe_kvm(binary: &Path, timeout: Duration) -> Result<(), AccelError> {
    probe(binary, timeout).map_err(AccelError::Probe)
}

fn probe(binary: &Path, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut cmd = Command::new(binary);
    cmd.args([
        "-machine",
        "none",
        "-accel",
        "kvm",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-qmp",
        "stdio",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let mut child = QemuChild::from_child(child).map_err(|e| wire::error_chain::one_line(&e))?;
    let (Some(stdin), Some(stdout), Some(mut stderr)) =
        (child.take_stdin(), child.take_stdout(), child.take_stderr())
    else {
        return Err("the probe's stdio pipes are missing".to_owned());
    };
    let remaining = || deadline.saturating_duration_since(Instant::now());
    let answer = QmpClient::from_streams(stdout, stdin, timeout).and_then(|mut qmp| {
        let kvm = qmp.execute_with_timeout("query-kvm", None, remaining())?;
        qmp.set_timeout(remaining());
        if let Err(e) = qmp.quit() {
            log::debug!(
                "KVM probe: quit failed: {}",
                wire::error_chain::one_line(&e)
            );
        }
        Ok(kvm)
    });
    // Reap (or kill) the probe before reading stderr, so the read cannot block.
    match child.wait_timeout(remaining()) {
        Ok(Some(_)) => {}
        Ok(None) | Err(_) => {
            if let Err(e) = child.kill_and_reap(Duration::from_secs(5)) {
                log::warn!("KVM probe: {}", wire::error_chain::one_line(&e));
            }
        }
    }
    let mut err_text = String::new();
    let _ = stderr.read_to_string(&mut err_text);
    let err_text = err_text.trim();
    match answer {
        Ok(kvm) if is_true(&kvm, "present") && is_true(&kvm, "enabled") => Ok(()),
        Ok(kvm) => Err(format!("query-kvm answered {kvm}")),
        Err(e) if err_text.is_empty() => Err(wire::error_chain::one_line(&e)),
        Err(e) => Err(format!(
            "{}; QEMU said: {err_text}",
            wire::error_chain::one_line(&e)
        )),
    }
}

fn is_true(v: &Value, key: &str) -> bool {
    v.get(key).and_then(Value::as_bool) == Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::fake_qemu;

    const INTEL: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse vmx sse2\nvmx flags\t: vnmi preemption_timer\n\nprocessor\t: 1\nflags\t\t: fpu vme de pse vmx sse2\n";
    const AMD: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 svm npt\n";
    const NONE: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme hypervisor sse2 vmxx svmy\nbugs\t\t: vmx svm\nvmx flags\t: vmx\n";

    #[test]
    fn cpu_flags() {
        assert_eq!(cpu_virt_flag(INTEL), Some("vmx"));
        assert_eq!(cpu_virt_flag(AMD), Some("svm"));
        // Look-alike flags, other keys and the "vmx flags" line do not count.
        assert_eq!(cpu_virt_flag(NONE), None);
        assert_eq!(cpu_virt_flag(""), None);
        assert_eq!(cpu_virt_flag("garbage without colons\n:::\n"), None);
    }

    #[test]
    fn override_values() {
        assert_eq!(parse_override(None).unwrap(), None);
        assert_eq!(parse_override(Some(OsStr::new(""))).unwrap(), None);
        assert_eq!(
            parse_override(Some(OsStr::new("kvm"))).unwrap(),
            Some(Accel::Kvm)
        );
        assert_eq!(
            parse_override(Some(OsStr::new(" TCG "))).unwrap(),
            Some(Accel::Tcg)
        );
        let err = parse_override(Some(OsStr::new("hvf"))).unwrap_err();
        assert!(err.to_string().contains("`hvf`"), "{err}");
    }

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn no_flag_means_tcg_without_touching_kvm() {
        let dir = tempfile::tempdir().unwrap();
        let cpuinfo = write(dir.path(), "cpuinfo", NONE);
        let choice = detect_host(
            Path::new("/nonexistent/qemu"),
            &cpuinfo,
            Path::new("/nonexistent/kvm"),
            Duration::from_secs(1),
        );
        assert_eq!(choice.accel, Accel::Tcg);
        assert!(choice.reason.contains("vmx/svm"), "{}", choice.reason);
    }

    #[test]
    fn missing_kvm_device_means_tcg() {
        let dir = tempfile::tempdir().unwrap();
        let cpuinfo = write(dir.path(), "cpuinfo", AMD);
        let choice = detect_host(
            Path::new("/nonexistent/qemu"),
            &cpuinfo,
            &dir.path().join("kvm"),
            Duration::from_secs(1),
        );
        assert_eq!(choice.accel, Accel::Tcg);
        assert!(
            choice.reason.ends_with("kvm: not present"),
            "{}",
            choice.reason
        );
    }

    #[test]
    fn failed_probe_means_tcg() {
        let dir = tempfile::tempdir().unwrap();
        let cpuinfo = write(dir.path(), "cpuinfo", INTEL);
        let kvm = write(dir.path(), "kvm", "");
        let choice = detect_host(
            Path::new("/nonexistent/qemu"),
            &cpuinfo,
            &kvm,
            Duration::from_secs(1),
        );
        assert_eq!(choice.accel, Accel::Tcg);
        assert!(
            choice.reason.starts_with("KVM probe failed: cannot start"),
            "{}",
            choice.reason
        );
    }

    const GREET: &str = r#"echo '{"QMP": {"version": {}, "capabilities": []}}'; read l; echo '{"return": {}, "id": 0}'"#;

    #[test]
    fn probe_accepts_present_and_enabled() {
        let dir = tempfile::tempdir().unwrap();
        let fake = fake_qemu(
            dir.path(),
            &format!(
                r#"{GREET}; read l; echo '{{"return": {{"enabled": true, "present": true}}, "id": 1}}'; read l; echo '{{"return": {{}}, "id": 2}}'"#
            ),
        );
        let dev = write(dir.path(), "kvm", "");
        let cpuinfo = write(dir.path(), "cpuinfo", INTEL);
        probe_kvm(&fake, Duration::from_secs(5)).unwrap();
        let choice = detect_host(&fake, &cpuinfo, &dev, Duration::from_secs(5));
        assert_eq!(choice.accel, Accel::Kvm, "{}", choice.reason);
    }

    #[test]
    fn probe_rejects_disabled_kvm() {
        let dir = tempfile::tempdir().unwrap();
        let fake = fake_qemu(
            dir.path(),
            &format!(
                r#"{GREET}; read l; echo '{{"return": {{"enabled": false, "present": true}}, "id": 1}}'; read l"#
            ),
        );
        let err = probe_kvm(&fake, Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(err.contains("query-kvm answered"), "{err}");
    }

    #[test]
    fn probe_reports_qemu_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let fake = fake_qemu(
            dir.path(),
            "echo 'Could not access KVM kernel module: Permission denied' >&2; exit 1",
        );
        let err = probe_kvm(&fake, Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(err.contains("Permission denied"), "{err}");
    }

    #[test]
    fn probe_kills_a_hung_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let fake = fake_qemu(dir.path(), "exec sleep 30");
        let started = Instant::now();
        let err = probe_kvm(&fake, Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(err.contains("greeting"), "{err}");
    }
}
