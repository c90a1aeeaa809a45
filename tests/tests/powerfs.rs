//! The power-loss filesystem (`lifeboat-powerfs`): what survives a crash is
//! exactly what was made durable under its model (docs/FAULTS.md) — fsynced
//! data survives, unsynced data does not, names need an fsync of their
//! directory, and the write-temp/fsync/rename/fsync-dir dance is atomic.
//! Each test mounts its own instance in a temporary directory, as root.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use lifeboat_tests::powerfs::{fuse_available, PowerMount};

fn mount() -> Option<(tempfile::TempDir, PowerMount)> {
    if !fuse_available() {
        eprintln!("skipping: needs root and /dev/fuse");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let m = PowerMount::mount(
        &dir.path().join("backing"),
        &dir.path().join("mnt"),
        dir.path(),
    )
    .unwrap();
    Some((dir, m))
}

fn fsync_dir(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

/// Power loss, then power on.
fn crash(m: &mut PowerMount) {
    m.crash().unwrap();
    m.start().unwrap();
}

fn read(p: &Path) -> Option<Vec<u8>> {
    std::fs::read(p).ok()
}

#[test]
fn fsynced_data_survives_and_unsynced_does_not() {
    let Some((_d, mut m)) = mount() else { return };
    let dir = m.mount.clone();
    let f = dir.join("a");
    let mut h = File::create(&f).unwrap();
    h.write_all(b"durable").unwrap();
    h.sync_all().unwrap();
    fsync_dir(&dir);
    h.write_all(b" and more").unwrap(); // never synced
    h.write_all_at(b"D", 0).unwrap(); // overwrite, never synced
    assert_eq!(
        read(&f).unwrap(),
        b"Durable and more",
        "the view shows every write"
    );
    drop(h);
    crash(&mut m);
    assert_eq!(read(&f).unwrap(), b"durable");
    assert_eq!(
        read(&m.backing.join("a")).unwrap(),
        b"durable",
        "the backing holds only durable data"
    );
}

#[test]
fn fdatasync_covers_appends_and_truncates() {
    let Some((_d, mut m)) = mount() else { return };
    let dir = m.mount.clone();
    let f = dir.join("journal");
    let h = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&f)
        .unwrap();
    fsync_dir(&dir);
    let mut w = &h;
    w.write_all(&[1u8; 5000]).unwrap();
    h.sync_data().unwrap();
    w.write_all(&[2u8; 3000]).unwrap();
    h.sync_data().unwrap();
    w.write_all(&[3u8; 100]).unwrap(); // torn tail: lost
    drop(h);
    crash(&mut m);
    let got = read(&f).unwrap();
    assert_eq!(got.len(), 8000);
    assert!(got[..5000].iter().all(|&b| b == 1) && got[5000..].iter().all(|&b| b == 2));
    // A truncate is durable only when synced, too.
    let h = OpenOptions::new().write(true).open(&f).unwrap();
    h.set_len(100).unwrap();
    drop(h);
    crash(&mut m);
    assert_eq!(
        read(&f).unwrap().len(),
        8000,
        "an unsynced truncate is undone"
    );
    let h = OpenOptions::new().write(true).open(&f).unwrap();
    h.set_len(100).unwrap();
    h.set_len(200).unwrap();
    h.sync_all().unwrap();
    drop(h);
    crash(&mut m);
    let got = read(&f).unwrap();
    assert_eq!(got.len(), 200);
    assert!(got[..100].iter().all(|&b| b == 1) && got[100..].iter().all(|&b| b == 0));
}

#[test]
fn a_new_file_needs_its_directory_fsynced() {
    let Some((_d, mut m)) = mount() else { return };
    let dir = m.mount.clone();
    let mut h = File::create(dir.join("new")).unwrap();
    h.write_all(b"data").unwrap();
    h.sync_all().unwrap(); // data durable, name not
    drop(h);
    std::fs::create_dir(dir.join("sub")).unwrap();
    crash(&mut m);
    assert!(
        read(&dir.join("new")).is_none(),
        "a name never fsynced is lost"
    );
    assert!(!dir.join("sub").exists());

    let mut h = File::create(dir.join("new")).unwrap();
    h.write_all(b"data").unwrap();
    fsync_dir(&dir); // name durable, data not
    drop(h);
    crash(&mut m);
    assert_eq!(
        read(&dir.join("new")).unwrap(),
        b"",
        "the name survives, empty"
    );
}

#[test]
fn rename_without_a_directory_fsync_is_undone() {
    let Some((_d, mut m)) = mount() else { return };
    let dir = m.mount.clone();
    std::fs::write(dir.join("state"), b"old").unwrap();
    File::open(dir.join("state")).unwrap().sync_all().unwrap();
    fsync_dir(&dir);
    // write-temp, fsync, rename — but no fsync of the directory.
    let mut t = File::create(dir.join("state.partial")).unwrap();
    t.write_all(b"new").unwrap();
    t.sync_all().unwrap();
    drop(t);
    std::fs::rename(dir.join("state.partial"), dir.join("state")).unwrap();
    assert_eq!(read(&dir.join("state")).unwrap(), b"new");
    crash(&mut m);
    assert_eq!(
        read(&dir.join("state")).unwrap(),
        b"old",
        "the rename is undone"
    );
    assert!(
        !dir.join("state.partial").exists(),
        "the temporary name was never durable"
    );

    // With the directory fsynced, the replacement is durable and atomic.
    let mut t = File::create(dir.join("state.partial")).unwrap();
    t.write_all(b"new").unwrap();
    t.sync_all().unwrap();
    drop(t);
    std::fs::rename(dir.join("state.partial"), dir.join("state")).unwrap();
    fsync_dir(&dir);
    crash(&mut m);
    assert_eq!(read(&dir.join("state")).unwrap(), b"new");
    assert!(!dir.join("state.partial").exists());
}

#[test]
fn rename_of_an_unsynced_file_keeps_no_data() {
    // object_store's LocalFileSystem: write a temporary file, rename it into
    // place, no fsync at all. The name may be made durable by a later fsync of
    // the directory, but the data never was.
    let Some((_d, mut m)) = mount() else { return };
    let dir = m.mount.clone();
    std::fs::create_dir_all(dir.join("log")).unwrap();
    fsync_dir(&dir);
    std::fs::write(dir.join("log/#tmp"), b"segment").unwrap();
    std::fs::rename(dir.join("log/#tmp"), dir.join("log/seg")).unwrap();
    crash(&mut m);
    assert!(
        read(&dir.join("log/seg")).is_none(),
        "nothing of an unsynced put survives"
    );
    assert!(dir.join("log").is_dir());
}

#[test]
fn unlink_without_a_directory_fsync_is_undone() {
    let Some((_d, mut m)) = mount() else { return };
    let dir = m.mount.clone();
    std::fs::write(dir.join("a"), b"keep").unwrap();
    File::open(dir.join("a")).unwrap().sync_all().unwrap();
    fsync_dir(&dir);
    std::fs::remove_file(dir.join("a")).unwrap();
    crash(&mut m);
    assert_eq!(read(&dir.join("a")).unwrap(), b"keep");
    std::fs::remove_file(dir.join("a")).unwrap();
    fsync_dir(&dir);
    crash(&mut m);
    assert!(read(&dir.join("a")).is_none());
    assert!(!m.backing.join("a").exists());
}

#[test]
fn a_file_open_after_unlink_keeps_its_data_until_closed() {
    let Some((_d, mut m)) = mount() else { return };
    let dir = m.mount.clone();
    let h = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(dir.join("x"))
        .unwrap();
    h.write_all_at(b"0123456789", 0).unwrap();
    h.sync_all().unwrap();
    fsync_dir(&dir);
    std::fs::remove_file(dir.join("x")).unwrap();
    fsync_dir(&dir); // the name is durably gone; the inode lives on while open
    let mut buf = [0u8; 10];
    h.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"0123456789");
    h.write_all_at(b"abc", 0).unwrap();
    h.sync_all().unwrap();
    h.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"abc3456789");
    drop(h);
    crash(&mut m);
    assert!(!dir.join("x").exists());
}

#[test]
fn a_clean_unmount_makes_everything_durable() {
    let Some((_d, mut m)) = mount() else { return };
    let dir = m.mount.clone();
    std::fs::create_dir_all(dir.join("a/b")).unwrap();
    std::fs::write(dir.join("a/b/c"), b"never synced").unwrap();
    std::fs::write(dir.join("top"), vec![7u8; 3 << 20]).unwrap();
    assert!(m.stop());
    assert_eq!(read(&m.backing.join("a/b/c")).unwrap(), b"never synced");
    assert_eq!(read(&m.backing.join("top")).unwrap(), vec![7u8; 3 << 20]);
    m.start().unwrap();
    assert_eq!(read(&dir.join("a/b/c")).unwrap(), b"never synced");
}

#[test]
fn a_unix_socket_can_be_bound_and_reached() {
    // The agent's and the server's control sockets live in directories on it.
    let Some((_d, m)) = mount() else { return };
    let p = m.mount.join("control.sock");
    let l = std::os::unix::net::UnixListener::bind(&p).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"hello").unwrap();
    });
    let mut c = std::os::unix::net::UnixStream::connect(&p).unwrap();
    let mut got = String::new();
    std::io::Read::read_to_string(&mut c, &mut got).unwrap();
    t.join().unwrap();
    assert_eq!(got, "hello");
}

/// A full disk (SIGUSR2 until SIGHUP): what needs new space fails with
/// ENOSPC (and statfs shows none free), overwrites, creates, removals and
/// fsyncs go on; with room again everything works, and what was fsynced
/// while full survives a power loss.
#[test]
fn a_full_disk_refuses_what_needs_space_until_it_has_room_again() {
    let Some((_d, mut m)) = mount() else { return };
    let dir = m.mount.clone();
    let enospc = |r: std::io::Result<()>| {
        let e = r.expect_err("must fail on a full disk");
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    };
    let f = dir.join("wal");
    let mut h = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&f)
        .unwrap();
    h.write_all(b"0123456789").unwrap();
    h.sync_all().unwrap();
    fsync_dir(&dir);
    std::fs::write(dir.join("junk"), b"to be removed").unwrap();
    m.fill().unwrap();
    assert_eq!(lifeboat_tests::powerfs::free_bytes(&dir), Some(0));
    enospc(h.write_all(b"append"));
    enospc(h.write_all_at(b"past the end", 8));
    enospc(std::fs::create_dir(dir.join("d")));
    enospc(std::os::unix::fs::symlink("wal", dir.join("l")));
    // Room inside the file, a new (empty) file, removals and fsyncs.
    h.write_all_at(b"abc", 0).unwrap();
    h.sync_all().unwrap();
    let empty = dir.join("empty");
    File::create(&empty).unwrap().sync_all().unwrap();
    std::fs::remove_file(dir.join("junk")).unwrap();
    fsync_dir(&dir);
    let mut buf = [0u8; 10];
    h.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"abc3456789");
    m.free().unwrap();
    assert!(lifeboat_tests::powerfs::free_bytes(&dir).unwrap() > 0);
    h.write_all_at(b"!", 10).unwrap();
    std::fs::create_dir(dir.join("d")).unwrap();
    drop(h);
    crash(&mut m);
    assert_eq!(read(&f).unwrap(), b"abc3456789", "fsynced while full");
    assert!(empty.exists() && !dir.join("junk").exists());
}

/// `--statfs-free-max`: a small disk as `statfs` shows it (writes are not
/// limited by it).
#[test]
fn statfs_reports_at_most_the_free_space_it_is_told() {
    if !fuse_available() {
        eprintln!("skipping: needs root and /dev/fuse");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut m = PowerMount::mount_small(
        &dir.path().join("backing"),
        &dir.path().join("mnt"),
        dir.path(),
        Some(1 << 20),
    )
    .unwrap();
    let free = lifeboat_tests::powerfs::free_bytes(&m.mount).unwrap();
    assert!(free > 0 && free <= 1 << 20, "{free}");
    std::fs::write(m.mount.join("big"), vec![1u8; 3 << 20]).unwrap();
    m.fill().unwrap();
    m.free().unwrap();
    assert!(lifeboat_tests::powerfs::free_bytes(&m.mount).unwrap() <= 1 << 20);
}
