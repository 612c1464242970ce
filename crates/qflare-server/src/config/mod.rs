//! Server configuration: defaults, then `config/global_config.yaml`, then
//! `QFLARE_*` environment variables, then command-line flags (applied by the
//! caller on the returned struct). Unknown keys anywhere are an error, so a
//! typo cannot silently fall back to a default.
//!
//! Environment overrides name a path with double underscores:
//! `QFLARE_SERVER__LISTEN=0.0.0.0:8443` sets `server.listen`. Values are parsed
//! as YAML scalars (`true`, `42`, `[a, b]` work). A few common settings also
//! have short aliases (see [`ENV_ALIASES`]); when an alias and its long form
//! are both set, the long form wins, whatever order the environment lists
//! them in. The admin token is never part of the file: it comes from
//! `QFLARE_ADMIN_TOKEN` (or `.env`), or is generated into the state directory
//! on first start. Binaries read `.env` before parsing their command line, so
//! `QFLARE_CONFIG` and every other variable may be set there.
//!
//! The loader is written by hand rather than built on a configuration
//! library: it is small (a YAML merge and a path setter), and no library we
//! know gives exactly the alias rule above (short names mapped to paths, a
//! fixed precedence between an alias and its long form) together with
//! unknown-key errors from every layer.
//!
//! `sections` holds the types, their defaults and validation; `layers` holds
//! the layering.

mod layers;
mod sections;

use std::path::PathBuf;

pub use self::layers::ENV_ALIASES;
pub use self::sections::*;

/// Where the configuration file is looked for when none is named.
pub const DEFAULT_CONFIG_PATH: &str = "config/global_config.yaml";

/// A configuration problem, named precisely.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read. The inner error is part of the message,
    /// not a `source()`, so a chain printed with `{:#}` says it once.
    #[error("cannot read config file {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The YAML (or an environment value) is invalid, or a key is unknown.
    #[error("invalid configuration ({origin}): {message}")]
    Invalid {
        /// Where the bad value came from.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

pub(crate) fn invalid(origin: &str, error: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        origin: origin.to_owned(),
        message: error.to_string(),
    }
}
