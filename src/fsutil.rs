//! Small file-system helpers for files that hold secrets.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use rand::RngCore;
use rand::rngs::OsRng;

/// Writes `bytes` to `path` so that readers see the old file or the new one, never a
/// mix: a temporary file in the same directory (mode 0600), fsync, rename, fsync of the
/// directory. The temporary file is removed if any step fails. When `path` exists, its
/// owner is kept where the process may set it (as root), so an edit made by the admin
/// stays readable by the daemon's account.
pub fn write_private_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}-{:016x}", std::process::id(), OsRng.next_u64()));
    let tmp = dir.join(tmp_name);

    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        if let Ok(old) = fs::metadata(path) {
            // Best effort: only root may give a file away, and then it should.
            let _ = std::os::unix::fs::fchown(&file, Some(old.uid()), Some(old.gid()));
        }
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    File::open(dir)?.sync_all()
}

/// An exclusive advisory lock (`flock`) on a lock file, held until dropped (closing the file
/// releases it, also if the process dies): the one-writer-at-a-time rule of the files under
/// the state directory that the daemon and admin commands both write.
#[derive(Debug)]
pub struct WriteLock {
    _file: File,
}

impl WriteLock {
    /// Waits until this process holds the lock on `path`, creating the file (mode 0600) if
    /// needed. Blocks: call it off the async workers.
    pub fn acquire(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path)?;
        loop {
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive) {
                Ok(()) => return Ok(Self { _file: file }),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(io::Error::from(e)),
            }
        }
    }
}
