//! The cluster key: 32 random bytes, stored hex-encoded in a file of mode 0600.
//!
//! Every PCT and every yod of a cluster hold the same key; the control link proves
//! possession of it in both directions (see [`crate::proto`]).

use crate::error::{PctError, Result};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Length of the cluster key in bytes.
pub const KEY_LEN: usize = 32;

/// A loaded cluster key.
#[derive(Clone)]
pub struct ClusterKey([u8; KEY_LEN]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(<secret>)")
    }
}

/// Where keys live when no path is given: `$PUMA_KEY`, else
/// `$XDG_CONFIG_HOME/puma/cluster.key`, else `~/.config/puma/cluster.key`.
pub fn default_key_path() -> PathBuf {
    if let Some(p) = std::env::var_os("PUMA_KEY") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("/etc"));
    base.join("puma").join("cluster.key")
}

/// Fills `buf` with random bytes from the kernel.
pub fn random_bytes(buf: &mut [u8]) -> Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = rustix::rand::getrandom(&mut buf[filled..], rustix::rand::GetRandomFlags::empty())
            .map_err(|e| PctError::io("reading random bytes", e.into()))?;
        filled += n;
    }
    Ok(())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

impl ClusterKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self> {
        let mut k = [0u8; KEY_LEN];
        random_bytes(&mut k)?;
        Ok(ClusterKey(k))
    }

    /// The raw key bytes (for HMAC).
    pub fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Writes the key to `path` with mode 0600 (temporary file + rename, so a reader
    /// never sees half a key). Refuses to overwrite an existing key unless `force`.
    pub fn write(&self, path: &Path, force: bool) -> Result<()> {
        let err = |reason: String| PctError::Key {
            path: path.display().to_string(),
            reason,
        };
        // The rename below replaces the directory entry: a device, FIFO or symbolic link in
        // its place would be lost (and a key is no output to stream), so only a regular file
        // or nothing may be there.
        if let Ok(m) = fs::symlink_metadata(path) {
            if !m.file_type().is_file() {
                return Err(err(
                    "is not a regular file (a device, FIFO, directory or symbolic link); \
                     name a plain file for the key"
                        .into(),
                ));
            }
        }
        if path.exists() && !force {
            return Err(err(
                "already exists; pass --force to replace it (every node must then get the new key)"
                    .into(),
            ));
        }
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                fs::create_dir_all(dir)
                    .map_err(|e| err(format!("cannot create directory: {e}")))?;
            }
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| err(format!("cannot create {}: {e}", tmp.display())))?;
        let text = format!("{}\n", hex(&self.0));
        let res = f
            .write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .and_then(|_| fs::rename(&tmp, path));
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(err(format!("cannot write: {e}")));
        }
        Ok(())
    }

    /// Reads a key file; refuses files readable by group or others.
    pub fn load(path: &Path) -> Result<Self> {
        let err = |reason: String| PctError::Key {
            path: path.display().to_string(),
            reason,
        };
        let meta = fs::metadata(path).map_err(|e| {
            err(format!(
                "cannot read ({e}); create one with `yod keygen` or `pct keygen`"
            ))
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(err(format!(
                "mode is {mode:03o}; the key must be private (chmod 600)"
            )));
        }
        let text = fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let bytes = unhex(text.trim()).ok_or_else(|| err("not a hex-encoded key".into()))?;
        let arr: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| err(format!("key must be {KEY_LEN} bytes (64 hex digits)")))?;
        Ok(ClusterKey(arr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    #[test]
    fn write_then_load_round_trips_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/cluster.key");
        let k = ClusterKey::generate().unwrap();
        k.write(&p, false).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(ClusterKey::load(&p).unwrap().bytes(), k.bytes());
        assert!(k.write(&p, false).is_err(), "must not overwrite silently");
    }

    #[test]
    fn write_refuses_to_replace_a_device_or_a_link_even_with_force() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.key");
        fs::write(&real, "old\n").unwrap();
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let k = ClusterKey::generate().unwrap();
        let e = k.write(&link, true).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read_to_string(&real).unwrap(), "old\n");
        // The null device is refused before anything is written (it stays a device).
        let e = k
            .write(Path::new("/dev/null"), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        assert!(fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device());
    }

    #[test]
    fn load_refuses_world_readable_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        fs::write(&p, "zz\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(ClusterKey::load(&p).is_err());
        ClusterKey::generate().unwrap().write(&p, true).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = ClusterKey::load(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }
}
