//! `lifeboat-powerfs --backing DIR --mount DIR [--scratch DIR] [--fsync-persists-name]
//! [--statfs-free-max BYTES]`
//!
//! Mounts powerfs (see the library) and serves it until a signal:
//! SIGUSR1 = power loss (everything unsynced is dropped, the mount goes away,
//! exit status 0); SIGTERM/SIGINT = clean unmount (everything made durable
//! first). SIGUSR2 = the disk is full (requests that need new space fail with
//! ENOSPC, statfs shows no free space), SIGHUP = it has room again; both keep
//! serving. Prints `mounted` on stdout once the mount serves requests.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use lifeboat_powerfs::{Options, PowerFs, State};

fn main() -> Result<()> {
    let mut backing = None;
    let mut mount = None;
    let mut scratch = None;
    let mut fsync_persists_name = false;
    let mut statfs_free_max = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--backing") => backing = args.next().map(PathBuf::from),
            Some("--mount") => mount = args.next().map(PathBuf::from),
            Some("--scratch") => scratch = args.next().map(PathBuf::from),
            Some("--fsync-persists-name") => fsync_persists_name = true,
            Some("--statfs-free-max") => {
                let v = args.next().and_then(|v| v.to_str()?.parse::<u64>().ok());
                let Some(v) = v else {
                    bail!("--statfs-free-max needs a number of bytes");
                };
                statfs_free_max = Some(v);
            }
            _ => bail!(
                "unknown argument {a:?}; usage: lifeboat-powerfs --backing DIR --mount DIR [--scratch DIR] [--fsync-persists-name] [--statfs-free-max BYTES]"
            ),
        }
    }
    let (Some(backing), Some(mount)) = (backing, mount) else {
        bail!("--backing and --mount are required");
    };
    let backing = backing
        .canonicalize()
        .with_context(|| format!("backing directory {}", backing.display()))?;
    let mount = mount
        .canonicalize()
        .with_context(|| format!("mount point {}", mount.display()))?;
    let scratch = scratch.unwrap_or_else(|| {
        let mut s = backing.clone().into_os_string();
        s.push(".scratch");
        PathBuf::from(s)
    });

    // Signals are taken by one thread (sigwait), never by a handler.
    // SAFETY: plain libc signal-set calls on a zeroed set, before any thread starts.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [
            libc::SIGUSR1,
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGUSR2,
            libc::SIGHUP,
        ] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };

    let state = State::load(Options {
        backing: backing.clone(),
        scratch,
        fsync_persists_name,
        statfs_free_max,
    })
    .with_context(|| format!("loading {}", backing.display()))?;
    let state = Arc::new(Mutex::new(state));
    let fs = PowerFs {
        state: state.clone(),
        fsync_persists_name,
    };
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName("powerfs".into()),
        fuser::MountOption::Subtype("powerfs".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    cfg.acl = fuser::SessionACL::All;
    let session = fuser::Session::new(fs, &mount, &cfg)
        .with_context(|| format!("mounting {}", mount.display()))?;
    let mount_for_signals = mount.clone();
    std::thread::spawn(move || {
        let mut sig: libc::c_int = 0;
        loop {
            // SAFETY: sigwait on the set blocked above.
            unsafe { libc::sigwait(&set, &mut sig) };
            if sig != libc::SIGUSR2 && sig != libc::SIGHUP {
                break;
            }
            let full = sig == libc::SIGUSR2;
            state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_full(full);
            eprintln!(
                "powerfs: {} {}",
                mount_for_signals.display(),
                if full { "is full" } else { "has room again" }
            );
        }
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        if sig != libc::SIGUSR1 {
            if let Err(e) = st.sync_all() {
                eprintln!("powerfs: making everything durable at unmount failed: {e:?}");
            }
        }
        let c = std::ffi::CString::new(mount_for_signals.as_os_str().as_encoded_bytes())
            .expect("a path without NUL");
        // SAFETY: umount2(2) with a C string; the state lock stays held until exit,
        // so no request changes the backing directory after this point.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        eprintln!(
            "powerfs: {} {}",
            if sig == libc::SIGUSR1 {
                "crashed"
            } else {
                "unmounted"
            },
            mount_for_signals.display()
        );
        std::process::exit(0);
    });
    println!("mounted");
    session.run().context("serving the mount")?;
    Ok(())
}
