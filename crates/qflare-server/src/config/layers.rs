//! The layering: built-in defaults, the YAML file, then `QFLARE_*`
//! environment variables, merged as YAML values before one typed decode (so
//! an unknown key from any layer is reported by name).
//!
//! Precedence within the environment is fixed, not left to the order in
//! which the process environment lists its variables: aliases (see
//! [`ENV_ALIASES`]) are applied first and long forms
//! (`QFLARE_<SECTION>__<KEY>`) after them, each group in name order, so the
//! long form wins when both name the same setting.

use std::path::{Path, PathBuf};

use serde_yaml_ng::{Mapping, Value};

use super::{Config, ConfigError, DEFAULT_CONFIG_PATH, invalid};

/// Short environment names for the most common settings.
pub const ENV_ALIASES: &[(&str, &str)] = &[
    ("QFLARE_LISTEN", "server.listen"),
    ("QFLARE_METRICS_LISTEN", "server.metrics_listen"),
    ("QFLARE_STATE_DIR", "server.state_dir"),
    ("QFLARE_DATABASE_URL", "server.database_url"),
    ("QFLARE_REDIS_URL", "server.redis_url"),
    ("QFLARE_ADVERTISE_ADDRESS", "server.advertise_address"),
];

impl Config {
    /// Loads the layered configuration. `path` names a file that must exist;
    /// without it the default path is used if present.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(path, &env)
    }

    /// [`Config::load`] with an explicit environment (for tests).
    pub fn load_from(path: Option<&Path>, env: &[(String, String)]) -> Result<Self, ConfigError> {
        let mut value =
            serde_yaml_ng::to_value(Self::default()).map_err(|e| invalid("defaults", e))?;
        let file = match path {
            Some(path) => Some(path.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()),
        };
        if let Some(file) = file {
            let text = std::fs::read_to_string(&file).map_err(|error| ConfigError::Read {
                path: file.clone(),
                error,
            })?;
            let overlay: Value = serde_yaml_ng::from_str(&text)
                .map_err(|e| invalid(&file.display().to_string(), e))?;
            if !overlay.is_null() {
                merge(&mut value, overlay, &file.display().to_string())?;
            }
        }
        for (name, path, raw) in env_overrides(env) {
            let parsed: Value = serde_yaml_ng::from_str(raw).map_err(|e| invalid(name, e))?;
            set_path(&mut value, &path, parsed, name)?;
        }
        serde_yaml_ng::from_value(value).map_err(|e| invalid("merged configuration", e))
    }
}

/// The environment's configuration overrides as `(variable, path, value)`,
/// in the order they are applied: aliases first, then long forms, each group
/// sorted by variable name. Applying later entries over earlier ones makes a
/// long form beat its alias, and the result independent of the order of `env`.
fn env_overrides(env: &[(String, String)]) -> Vec<(&str, String, &str)> {
    let mut aliases = Vec::new();
    let mut long_forms = Vec::new();
    for (name, raw) in env {
        if let Some((_, path)) = ENV_ALIASES.iter().find(|(alias, _)| alias == name) {
            aliases.push((name.as_str(), (*path).to_owned(), raw.as_str()));
        } else if let Some(rest) = name
            .strip_prefix("QFLARE_")
            .filter(|rest| rest.contains("__"))
        {
            let path = rest
                .split("__")
                .map(str::to_ascii_lowercase)
                .collect::<Vec<_>>()
                .join(".");
            long_forms.push((name.as_str(), path, raw.as_str()));
        }
    }
    aliases.sort_by(|a, b| a.0.cmp(b.0));
    long_forms.sort_by(|a, b| a.0.cmp(b.0));
    aliases.extend(long_forms);
    aliases
}

/// Deep-merges `overlay` into `base`. Keys absent from `base` are kept so the
/// final typed decode reports them as unknown.
fn merge(base: &mut Value, overlay: Value, origin: &str) -> Result<(), ConfigError> {
    match (base, overlay) {
        (Value::Mapping(base), Value::Mapping(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(slot) if slot.is_mapping() && value.is_mapping() => {
                        merge(slot, value, origin)?
                    }
                    _ => {
                        base.insert(key, value);
                    }
                }
            }
            Ok(())
        }
        (_, Value::Mapping(_)) | (Value::Mapping(_), _) => {
            Err(invalid(origin, "expected a mapping at the top level"))
        }
        (slot, value) => {
            *slot = value;
            Ok(())
        }
    }
}

fn set_path(root: &mut Value, path: &str, value: Value, origin: &str) -> Result<(), ConfigError> {
    let mut node = root;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let Value::Mapping(map) = node else {
            return Err(invalid(
                origin,
                format!("{path} does not name a configuration section"),
            ));
        };
        let key = Value::String((*part).to_owned());
        if i + 1 == parts.len() {
            map.insert(key, value);
            return Ok(());
        }
        node = map
            .entry(key)
            .or_insert_with(|| Value::Mapping(Mapping::new()));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use qflare_protocol::KemSuite;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid_once_the_enclave_trust_is_chosen() {
        let mut config = Config::load_from(None, &[]).unwrap();
        assert_eq!(config.crypto.default_kem_suite, KemSuite::MlKem768);
        // Software mode is off and no TEE is named: a server with the
        // federation on must be told which enclave to trust.
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("QFLARE_ENCLAVE__ALLOW_SOFTWARE_MODE=true"),
            "{err}"
        );
        let chosen = Config::load_from(
            None,
            &env(&[("QFLARE_ENCLAVE__ALLOW_SOFTWARE_MODE", "true")]),
        )
        .unwrap();
        chosen.validate().unwrap();
        config.federation.enabled = false;
        config.validate().unwrap();
    }

    #[test]
    fn file_then_env_layering() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            "server:\n  listen: 0.0.0.0:9000\nsessions:\n  lifetime_secs: 60\n",
        )
        .unwrap();
        let config = Config::load_from(
            Some(&path),
            &env(&[
                ("QFLARE_SESSIONS__LIFETIME_SECS", "120"),
                ("QFLARE_DATABASE_URL", "postgres://u:pw@db/q"),
                ("QFLARE_DATA_DIR", "/ignored/not/config"),
            ]),
        )
        .unwrap();
        assert_eq!(config.server.listen.port(), 9000);
        assert_eq!(config.sessions.lifetime_secs, 120, "env beats the file");
        assert_eq!(
            config.server.database_url.as_deref(),
            Some("postgres://u:pw@db/q")
        );
        let shown = format!("{config:?}");
        assert!(!shown.contains("pw"), "passwords are redacted: {shown}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "server:\n  lisen: 0.0.0.0:9000\n").unwrap();
        let err = Config::load_from(Some(&path), &[]).unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
        let err = Config::load_from(None, &env(&[("QFLARE_SERVER__NOPE", "1")])).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        assert!(Config::load_from(Some(Path::new("/no/such/file.yaml")), &[]).is_err());
    }

    #[test]
    fn the_documented_config_file_is_exactly_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/global_config.yaml");
        let from_file = Config::load_from(Some(&path), &[]).unwrap();
        assert_eq!(from_file, Config::default());
    }

    #[test]
    fn a_long_form_beats_its_alias_in_any_order() {
        let alias = ("QFLARE_LISTEN", "127.0.0.1:1111");
        let long = ("QFLARE_SERVER__LISTEN", "127.0.0.1:2222");
        for pairs in [[alias, long], [long, alias]] {
            let config = Config::load_from(None, &env(&pairs)).unwrap();
            assert_eq!(config.server.listen.port(), 2222, "{pairs:?}");
        }
        // An alias alone still works, and beats the file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "server:\n  listen: 0.0.0.0:9000\n").unwrap();
        let config = Config::load_from(Some(&path), &env(&[alias])).unwrap();
        assert_eq!(config.server.listen.port(), 1111);
    }
}
