//! The scratch folder of one test process, for fixtures that live as long as the process.
//!
//! Tests keep their tiny models in `OnceLock` statics so that each test binary writes them once.
//! Rust never drops a static, so a `TempDir` held there is never removed: every run left its
//! models behind in the system's temporary folder (hundreds of MiB per run, until a CI machine's
//! disk filled). A fixture held for the whole process belongs in [`process_scratch`] instead:
//! the folder is removed when the process exits, and a folder whose process died without
//! exiting (killed by a timeout, SIGKILL) is swept by the next test process that starts.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The parent of every test process's scratch folder.
fn scratch_root() -> PathBuf {
    std::env::temp_dir().join("gemma-cluster-tests")
}

fn folder_name(pid: u32) -> String {
    format!("pid-{pid}")
}

/// This process's scratch folder, made (and the folders of dead processes swept) on first use.
///
/// # Panics
/// When the folder cannot be made: a test cannot run without its fixtures.
pub fn process_scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = scratch_root();
        sweep_dead_processes(&root);
        let dir = root.join(folder_name(std::process::id()));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("making the test scratch folder {}: {e}", dir.display()));
        // SAFETY: `atexit` only records a function pointer; `remove_process_scratch` touches
        // nothing but the file system.
        unsafe { libc::atexit(remove_process_scratch) };
        dir
    })
}

extern "C" fn remove_process_scratch() {
    let dir = scratch_root().join(folder_name(std::process::id()));
    let _ = std::fs::remove_dir_all(dir);
}

/// Removes the scratch folders of processes that no longer run. Only where /proc tells which
/// processes run: elsewhere nothing is swept, so a live process's folder is never removed.
fn sweep_dead_processes(root: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("pid-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_folder_of_a_dead_process_is_swept_and_a_live_one_kept() {
        let root = tempfile::tempdir().expect("temp dir");
        // The largest pid Linux hands out is 2^22; one above it never runs.
        let dead = root.path().join(folder_name(4_194_305));
        let live = root.path().join(folder_name(std::process::id()));
        let other = root.path().join("not-a-process");
        for dir in [&dead, &live, &other] {
            std::fs::create_dir_all(dir).expect("mkdir");
        }
        sweep_dead_processes(root.path());
        assert!(!dead.exists());
        assert!(live.exists());
        assert!(other.exists());
    }
}
