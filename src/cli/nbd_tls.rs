//! NBD over TLS on the command line: `--nbd-tls off|offer|require` and
//! `--nbd-tls-username` of `controller serve` and `up`, and
//! `strata key psk`, which prints a volume's pre-shared key for clients.

use std::sync::Arc;

use clap::{Args, ValueEnum};
use strata_controller::frontend::nbd::{NbdTls, Psk, TlsMode};

/// `--nbd-tls` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NbdTlsArg {
    /// No TLS: STARTTLS is refused.
    Off,
    /// Clients may start TLS; plaintext clients (the kernel NBD client)
    /// are served too.
    Offer,
    /// Only clients that start TLS with the key reach the volume.
    Require,
}

impl From<NbdTlsArg> for TlsMode {
    fn from(a: NbdTlsArg) -> TlsMode {
        match a {
            NbdTlsArg::Off => TlsMode::Off,
            NbdTlsArg::Offer => TlsMode::Offer,
            NbdTlsArg::Require => TlsMode::Require,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct NbdTlsArgs {
    /// NBD over TLS (NBD_OPT_STARTTLS) with the volume's pre-shared key,
    /// derived from the cluster key (`strata key psk` prints it for
    /// clients: nbds:// URIs with tls-psk-file, qemu's tls-creds-psk).
    /// Default: offer with a cluster key (the kernel NBD client cannot
    /// speak TLS; a NetworkPolicy guards that path), off without.
    /// `require` refuses plaintext clients and needs the cluster key.
    #[arg(long, env = "STRATA_NBD_TLS", value_enum, value_name = "MODE")]
    pub nbd_tls: Option<NbdTlsArg>,
    /// The PSK identity (user name) TLS clients must name.
    #[arg(long, env = "STRATA_NBD_TLS_USERNAME", default_value = strata_controller::frontend::nbd::psk::DEFAULT_USERNAME, value_name = "NAME")]
    pub nbd_tls_username: String,
}

/// Why NBD TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum NbdTlsSetupError {
    #[error("--nbd-tls {0} needs the cluster key (--cluster-key-file PATH or STRATA_CLUSTER_KEY_FILE): the TLS pre-shared key is derived from it")]
    NoKey(TlsMode),
    #[error("`strata key psk` needs the cluster key: --cluster-key-file PATH or STRATA_CLUSTER_KEY_FILE")]
    NoKeyForPsk,
    #[error("{0:?} is not a volume name (1 to 64 of A-Z a-z 0-9 . _ -)")]
    BadVolume(String),
}

/// The TLS mode in effect: `--nbd-tls`, else offer with a key, off without.
pub fn effective_mode(arg: Option<NbdTlsArg>, keyed: bool) -> TlsMode {
    match arg {
        Some(a) => a.into(),
        None if keyed => TlsMode::Offer,
        None => TlsMode::Off,
    }
}

impl NbdTlsArgs {
    /// The NBD server's TLS for `volume`: `None` when off.
    pub fn setup(&self, volume: &str) -> anyhow::Result<Option<Arc<NbdTls>>> {
        let key = strata_replica::auth::process_key();
        let mode = effective_mode(self.nbd_tls, key.is_some());
        if mode == TlsMode::Off {
            return Ok(None);
        }
        let key = key.ok_or(NbdTlsSetupError::NoKey(mode))?;
        let psk = Psk::derived(key, volume, &self.nbd_tls_username)?;
        Ok(Some(Arc::new(NbdTls::new(mode, &psk)?)))
    }
}

/// `strata key psk`: the derived NBD TLS key of `volume` as a psktool line.
pub fn print_psk(volume: &str, username: &str) -> anyhow::Result<()> {
    if !strata_replica::host::valid_volume_name(volume) {
        return Err(NbdTlsSetupError::BadVolume(volume.to_string()).into());
    }
    let key = strata_replica::auth::process_key().ok_or(NbdTlsSetupError::NoKeyForPsk)?;
    let psk = Psk::derived(key, volume, username)?;
    // Comments would break the format: qemu and libnbd read every line as
    // `name:hexkey`. The explanation goes to stderr.
    eprintln!("# NBD TLS pre-shared key of volume {volume} for user {username}, derived from");
    eprintln!("# the cluster key. Keep it secret: it opens the volume. Save it as a file:");
    eprintln!("#   nbdinfo 'nbds://{username}@HOST:PORT/{volume}?tls-psk-file=FILE'");
    eprintln!(
        "#   qemu: --object tls-creds-psk,id=tls0,endpoint=client,dir=DIR,username={username}"
    );
    eprintln!("#         (the file saved as DIR/keys.psk), then tls-creds=tls0 on the nbd drive");
    print!("{}", psk.file_text());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_offer_with_a_key_and_off_without() {
        assert_eq!(effective_mode(None, true), TlsMode::Offer);
        assert_eq!(effective_mode(None, false), TlsMode::Off);
        assert_eq!(
            effective_mode(Some(NbdTlsArg::Require), true),
            TlsMode::Require
        );
        assert_eq!(effective_mode(Some(NbdTlsArg::Off), true), TlsMode::Off);
        // Asked for without a key: `setup` refuses (checked by the tests
        // that run `strata`; the process key is global).
        assert_eq!(
            effective_mode(Some(NbdTlsArg::Offer), false),
            TlsMode::Offer
        );
    }
}
