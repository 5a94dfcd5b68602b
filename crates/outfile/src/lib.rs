//! Output files that a user names on a command line (`--json F`, `--out F`, ...).
//!
//! A regular file is written whole or not at all: the bytes go to a temporary file in the same
//! directory, which is renamed over the name only once everything is written, so a failure (a
//! full disk, an error while producing the content) leaves the old file as it was and no
//! temporary behind.
//!
//! A rename replaces whatever directory entry carries the name, which is right for a regular
//! file and wrong for everything else: `--json /dev/null` would put a regular file in place of
//! the null device, and a name that is a symbolic link would lose the link. So:
//! * a name that is (or leads through links to) a device, FIFO or socket is opened and written
//!   in place, as a shell's `>` would (there is nothing to replace whole);
//! * a symbolic link to a regular file keeps the link: the file it leads to is replaced;
//! * a dangling symbolic link is written through, creating the file it names;
//! * a directory is an error.
#![forbid(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};

/// Where the bytes for a name go.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// A regular file (or none yet) at this path, replaced by a rename.
    Replace(PathBuf),
    /// Not a regular file (device, FIFO, socket, dangling link): written in place.
    InPlace,
}

fn target(path: &Path) -> io::Result<Target> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(io::Error::new(ErrorKind::IsADirectory, "is a directory")),
        Ok(m) if !m.is_file() => Ok(Target::InPlace),
        Ok(_) => {
            if fs::symlink_metadata(path)?.file_type().is_symlink() {
                Ok(Target::Replace(fs::canonicalize(path)?))
            } else {
                Ok(Target::Replace(path.to_path_buf()))
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            if fs::symlink_metadata(path).is_ok() {
                Ok(Target::InPlace)
            } else {
                Ok(Target::Replace(path.to_path_buf()))
            }
        }
        Err(e) => Err(e),
    }
}

/// The directory `path` lives in and the temporary name written there before the rename
/// (`.NAME.tmpPID`).
pub fn temp_beside(path: &Path) -> (PathBuf, PathBuf) {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    (dir.to_path_buf(), tmp)
}

/// Check, before work that may take minutes, that [`write`] will be able to write `path`: not
/// a directory, its directory exists and takes a new file (probed with the temporary name,
/// removed at once). A device, FIFO or socket passes without being opened (opening a FIFO for
/// writing would wait for a reader).
pub fn check_writable(path: &Path) -> io::Result<()> {
    let Target::Replace(real) = target(path)? else {
        return Ok(());
    };
    let (dir, tmp) = temp_beside(&real);
    if !dir.is_dir() {
        return Err(io::Error::new(
            ErrorKind::NotFound,
            format!(
                "the directory to write into, {}, does not exist",
                dir.display()
            ),
        ));
    }
    File::create(&tmp)?;
    let _ = fs::remove_file(&tmp);
    Ok(())
}

/// How [`write`] finishes a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Rename once the bytes are handed to the kernel.
    Rename,
    /// `fsync` the temporary file before the rename (the content survives a crash, too).
    SyncThenRename,
}

/// Write `path` with the bytes `fill` produces: a regular file whole or not at all, anything
/// else in place (see the crate documentation). On error a regular file keeps its old content
/// and no temporary file is left.
pub fn write(
    path: &Path,
    durability: Durability,
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    match target(path)? {
        Target::InPlace => {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)?;
            let mut w = BufWriter::with_capacity(1 << 20, f);
            fill(&mut w)?;
            w.flush()
        }
        Target::Replace(real) => {
            let (_, tmp) = temp_beside(&real);
            let res = (|| {
                let f = File::create(&tmp)?;
                let mut w = BufWriter::with_capacity(1 << 20, f);
                fill(&mut w)?;
                w.flush()?;
                if durability == Durability::SyncThenRename {
                    w.get_ref().sync_all()?;
                }
                drop(w);
                fs::rename(&tmp, &real)
            })();
            if res.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            res
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, FileTypeExt};

    fn text(s: &'static str) -> impl FnOnce(&mut dyn Write) -> io::Result<()> {
        move |w| w.write_all(s.as_bytes())
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_regular_file_is_replaced_whole_and_kept_on_error() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("out.json");
        write(&p, Durability::Rename, text("first")).expect("write");
        write(&p, Durability::SyncThenRename, text("second")).expect("write");
        assert_eq!(fs::read_to_string(&p).expect("read"), "second");
        let e = write(&p, Durability::Rename, |w| {
            w.write_all(b"half")?;
            Err(io::Error::other("the content failed"))
        })
        .expect_err("must fail");
        assert!(e.to_string().contains("the content failed"), "{e}");
        assert_eq!(fs::read_to_string(&p).expect("read"), "second");
        assert_eq!(entries(d.path()), ["out.json"], "no temporary left");
    }

    #[test]
    fn a_link_to_a_file_stays_a_link_and_its_file_is_replaced() {
        let d = tempfile::tempdir().expect("tempdir");
        let real = d.path().join("real.csv");
        fs::write(&real, "old").expect("write");
        let link = d.path().join("link.csv");
        symlink(&real, &link).expect("symlink");
        write(&link, Durability::Rename, text("new")).expect("write");
        assert!(fs::symlink_metadata(&link)
            .expect("meta")
            .file_type()
            .is_symlink());
        assert_eq!(fs::read_to_string(&real).expect("read"), "new");
        // A dangling link is written through: the file it names appears, the link stays.
        let gone = d.path().join("later.csv");
        let dangling = d.path().join("dangling.csv");
        symlink(&gone, &dangling).expect("symlink");
        write(&dangling, Durability::Rename, text("made")).expect("write");
        assert!(fs::symlink_metadata(&dangling)
            .expect("meta")
            .file_type()
            .is_symlink());
        assert_eq!(fs::read_to_string(&gone).expect("read"), "made");
    }

    #[test]
    fn the_null_device_stays_a_device() {
        let null = Path::new("/dev/null");
        match fs::metadata(null) {
            Ok(m) if m.file_type().is_char_device() => {}
            _ => {
                println!("SKIP: /dev/null is not a character device on this machine");
                return;
            }
        }
        assert_eq!(target(null).expect("target"), Target::InPlace);
        check_writable(null).expect("check");
        write(null, Durability::SyncThenRename, text("discarded")).expect("write");
        let m = fs::metadata(null).expect("meta");
        assert!(m.file_type().is_char_device(), "/dev/null was replaced");
        assert!(entries(Path::new("/dev"))
            .iter()
            .all(|n| !n.starts_with(".null.tmp")));
    }

    #[test]
    fn a_fifo_is_written_in_place_for_its_reader() {
        let d = tempfile::tempdir().expect("tempdir");
        let fifo = d.path().join("pipe");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !matches!(made, Ok(s) if s.success()) {
            println!("SKIP: mkfifo is not available");
            return;
        }
        check_writable(&fifo).expect("a FIFO passes the check without being opened");
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || fs::read_to_string(fifo).expect("read fifo"))
        };
        write(&fifo, Durability::Rename, text("through the pipe")).expect("write");
        assert_eq!(reader.join().expect("reader"), "through the pipe");
        assert!(fs::metadata(&fifo).expect("meta").file_type().is_fifo());
        assert_eq!(entries(d.path()), ["pipe"]);
    }

    #[test]
    fn a_directory_or_a_missing_directory_is_refused_before_the_work() {
        let d = tempfile::tempdir().expect("tempdir");
        let e = check_writable(d.path()).expect_err("a directory");
        assert_eq!(e.kind(), ErrorKind::IsADirectory);
        let e = write(d.path(), Durability::Rename, text("x")).expect_err("a directory");
        assert_eq!(e.kind(), ErrorKind::IsADirectory);
        let e = check_writable(&d.path().join("no/such/dir/out.json")).expect_err("missing");
        assert!(e.to_string().contains("does not exist"), "{e}");
        check_writable(&d.path().join("fine.json")).expect("writable");
        assert!(entries(d.path()).is_empty(), "the probe is removed");
    }
}
