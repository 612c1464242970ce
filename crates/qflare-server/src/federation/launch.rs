//! Starting the enclave: which program, with which arguments, and which
//! measurements and attestation modes the server accepts from it.

use qflare_enclave::host::EnclaveCommand;
use qflare_protocol::attestation::{self, AttestationMode, AttestationPolicy};

use super::FederationError;
use crate::config::Config;

/// How the server starts its enclave.
pub fn enclave_command(config: &Config) -> Result<EnclaveCommand, FederationError> {
    let mut args = config.enclave.args.clone();
    let mut push = |flag: &str, value: String| {
        args.push(flag.to_owned());
        args.push(value);
    };
    push("--kem", config.enclave.kem_suite.as_str().to_owned());
    push("--threads", config.enclave.threads.to_string());
    if let Some(root) = &config.enclave.root_data {
        push("--root-data", root.display().to_string());
    }
    if let Some(program) = &config.enclave.command {
        return Ok(EnclaveCommand {
            program: program.clone(),
            args,
        });
    }
    let exe = std::env::current_exe()
        .map_err(|e| FederationError::Inconsistent(format!("current executable: {e}")))?;
    let sibling = exe.with_file_name("qflare-enclave");
    if sibling.exists() {
        return Ok(EnclaveCommand {
            program: sibling,
            args,
        });
    }
    let mut own = vec!["enclave".to_owned()];
    own.extend(args);
    Ok(EnclaveCommand {
        program: exe,
        args: own,
    })
}

pub(super) fn policy(
    config: &Config,
    command: &EnclaveCommand,
) -> Result<AttestationPolicy, FederationError> {
    let mut allowed = Vec::new();
    for text in &config.enclave.allowed_measurements {
        let mut measurement = [0u8; 48];
        hex::decode_to_slice(text, &mut measurement).map_err(|_| {
            FederationError::Inconsistent("enclave.allowed_measurements: bad hex".into())
        })?;
        allowed.push(measurement);
    }
    if config.enclave.trust_spawned_binary {
        let measurement = qflare_enclave::backend::measure_file(&command.program).map_err(|e| {
            FederationError::Inconsistent(format!("measuring {}: {e}", command.program.display()))
        })?;
        allowed.push(measurement);
    }
    let mut allowed_modes = attestation::hardware_modes(&config.enclave.hardware);
    if config.enclave.allow_software_mode {
        allowed_modes.push(AttestationMode::Software);
    }
    Ok(AttestationPolicy {
        allowed_measurements: allowed,
        allowed_modes,
        max_age_secs: 600,
        // The operator chose the enclave's arguments; a sandbox left off
        // (`--seccomp log`) is warned about at start-up, and devices, which
        // require it by default, refuse that enclave's reports.
        require_sandbox: false,
        hardware: config.enclave.hardware.clone(),
    })
}
