//! The Debian packages: `packaging/build-debs.sh` builds lifeboat-agent,
//! lifeboat-ps and lifeboat-mt from the binaries under test (`bin_dir()`, or
//! `LIFEBOAT_BIN_DIR`) into a temporary directory. For each .deb: its control
//! fields, the files it installs, its maintainer scripts' syntax; then, in a
//! throwaway root from `dpkg-deb -x`: the binary runs and carries no debug
//! info, the unit passes `systemd-analyze verify`, and the configs it ships
//! (and the one its post-install's `init` writes) parse with its own binary.
//! Skips, saying so, only when dpkg-deb or systemd-analyze is missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lifeboat_tests::*;

/// Three binaries stripped and xz-compressed on 2 busy cores.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

struct Package {
    name: &'static str,
    /// Shared libraries beyond libc6 and libgcc-s1 it must depend on.
    extra_depends: &'static [&'static str],
    unit: bool,
    /// Other files it installs (absolute paths).
    files: &'static [&'static str],
}

const PACKAGES: [Package; 3] = [
    Package {
        name: "lifeboat-agent",
        extra_depends: &[],
        unit: true,
        files: &[
            "/etc/lifeboat/agent.toml",
            "/usr/share/doc/lifeboat-agent/examples/agent.toml",
            "/usr/share/doc/lifeboat-agent/copyright",
        ],
    },
    Package {
        name: "lifeboat-ps",
        // RocksDB is linked statically, its C++ runtime is not.
        extra_depends: &["libstdc++6"],
        unit: true,
        files: &[
            "/usr/share/doc/lifeboat-ps/examples/ps.toml",
            "/usr/share/doc/lifeboat-ps/copyright",
        ],
    },
    Package {
        name: "lifeboat-mt",
        extra_depends: &[],
        unit: false,
        files: &["/usr/share/doc/lifeboat-mt/copyright"],
    },
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// `[workspace.package] version` of the workspace's Cargo.toml.
fn workspace_version() -> String {
    let text = std::fs::read_to_string(workspace().join("Cargo.toml")).unwrap();
    let mut in_section = false;
    for line in text.lines() {
        if line.starts_with('[') {
            in_section = line == "[workspace.package]";
        } else if let (true, Some(v)) = (in_section, line.strip_prefix("version = ")) {
            return v.trim_matches('"').to_string();
        }
    }
    panic!("no [workspace.package] version in Cargo.toml");
}

fn field(deb: &Path, name: &str) -> String {
    let mut cmd = Command::new("dpkg-deb");
    cmd.arg("--field").arg(deb).arg(name);
    run_ok(&mut cmd, STEP_TIMEOUT).unwrap().trim().to_string()
}

fn has_debug_info(binary: &Path) -> bool {
    let mut cmd = Command::new("readelf");
    cmd.arg("--section-headers").arg("--wide").arg(binary);
    run_ok(&mut cmd, STEP_TIMEOUT)
        .unwrap()
        .contains(".debug_line")
}

/// `status --config` loads and checks the config, then fails to reach the
/// (absent) daemon's control socket: that failure, and no other, shows the
/// config is valid.
fn assert_config_valid(binary: &Path, config: &Path) {
    let out = run_timeout(
        Command::new(binary)
            .arg("status")
            .arg("--config")
            .arg(config),
        STEP_TIMEOUT,
    )
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("control socket"),
        "{} refuses {}: {err}",
        binary.display(),
        config.display()
    );
}

/// `systemd-analyze verify --root=ROOT` loads the unit from ROOT and resolves
/// its ExecStart= binary there too, so the unit is checked unchanged, against
/// the packaged binary. It also loads the targets the unit's default
/// dependencies name (sysinit.target, basic.target, ...): this host's are
/// copied in.
fn verify_unit(root: &Path, unit: &str) {
    let units = root.join("lib/systemd/system");
    for entry in std::fs::read_dir("/lib/systemd/system").unwrap() {
        let path = entry.unwrap().path();
        let target = units.join(path.file_name().unwrap());
        if path.extension().is_some_and(|e| e == "target") && !target.exists() {
            std::fs::copy(&path, target).unwrap();
        }
    }
    let out = run_timeout(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.display()))
            .arg(format!("/lib/systemd/system/{unit}")),
        STEP_TIMEOUT,
    )
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify {unit} ({}): {err}",
        out.status
    );
}

#[test]
fn debs_install_binaries_units_and_configs() {
    for tool in ["dpkg-deb", "systemd-analyze"] {
        if !have(tool) {
            eprintln!("SKIPPED: {tool} is not installed (apt-get install dpkg systemd)");
            return;
        }
    }
    let bins = match std::env::var_os("LIFEBOAT_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => bin("lifeboat-ps").parent().unwrap().to_path_buf(),
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("debs");
    let built = run_ok(
        Command::new(workspace().join("packaging/build-debs.sh"))
            .arg("--bin-dir")
            .arg(&bins)
            .arg("--out")
            .arg(&out),
        BUILD_TIMEOUT,
    )
    .unwrap();
    print!("{built}");
    assert_eq!(built.lines().filter(|l| l.starts_with("built ")).count(), 3);

    let version = workspace_version();
    let arch = run_ok(
        Command::new("dpkg").arg("--print-architecture"),
        STEP_TIMEOUT,
    )
    .unwrap()
    .trim()
    .to_string();
    for p in &PACKAGES {
        let deb = out.join(format!("{}_{version}_{arch}.deb", p.name));
        assert!(deb.exists(), "{} was not built", deb.display());
        assert_eq!(field(&deb, "Package"), p.name);
        assert_eq!(field(&deb, "Version"), version);
        assert_eq!(field(&deb, "Architecture"), arch);
        assert!(!field(&deb, "Maintainer").is_empty());
        assert!(!field(&deb, "Description").is_empty());
        let depends = field(&deb, "Depends");
        for lib in ["libc6 (>= ", "libgcc-s1"].iter().chain(p.extra_depends) {
            assert!(depends.contains(lib), "{}: Depends: {depends}", p.name);
        }

        let contents = run_ok(
            Command::new("dpkg-deb").arg("--contents").arg(&deb),
            STEP_TIMEOUT,
        )
        .unwrap();
        let unit = format!("/lib/systemd/system/{}.service", p.name);
        let binary = format!("/usr/bin/{}", p.name);
        let mut want = vec![binary.clone()];
        want.extend(p.files.iter().map(|f| f.to_string()));
        if p.unit {
            want.push(unit.clone());
        } else {
            assert!(!contents.contains("/lib/systemd/"), "{contents}");
        }
        for f in &want {
            assert!(
                contents.lines().any(|l| l.ends_with(&format!(".{f}"))),
                "{} lacks {f}:\n{contents}",
                p.name
            );
        }

        let control = tmp.path().join(format!("{}.control", p.name));
        run_ok(
            Command::new("dpkg-deb")
                .arg("--control")
                .arg(&deb)
                .arg(&control),
            STEP_TIMEOUT,
        )
        .unwrap();
        for script in ["postinst", "prerm", "postrm"] {
            let path = control.join(script);
            assert_eq!(path.exists(), p.unit, "{}: {script}", p.name);
            if p.unit {
                run_ok(Command::new("sh").arg("-n").arg(&path), STEP_TIMEOUT).unwrap();
            }
        }
        let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap_or_default();
        let want_conffiles = if p.name == "lifeboat-agent" {
            "/etc/lifeboat/agent.toml\n"
        } else {
            ""
        };
        assert_eq!(conffiles, want_conffiles, "{}: conffiles", p.name);

        let root = tmp.path().join(format!("{}.root", p.name));
        run_ok(
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
            STEP_TIMEOUT,
        )
        .unwrap();
        let packaged = root.join(binary.trim_start_matches('/'));
        run_ok(Command::new(&packaged).arg("--help"), STEP_TIMEOUT).unwrap();
        assert!(!has_debug_info(&packaged), "{} keeps debug info", p.name);
        assert!(
            has_debug_info(&bins.join(p.name)),
            "the input {} was stripped in place",
            p.name
        );
        if p.unit {
            verify_unit(&root, &format!("{}.service", p.name));
        }

        match p.name {
            "lifeboat-agent" => {
                let conffile = root.join("etc/lifeboat/agent.toml");
                let example = workspace().join("packaging/examples/agent.toml");
                assert_eq!(
                    std::fs::read(&conffile).unwrap(),
                    std::fs::read(example).unwrap()
                );
                assert_config_valid(&packaged, &conffile);
            }
            "lifeboat-ps" => check_ps(&root, &control, &packaged, tmp.path()),
            _ => {}
        }
    }
}

/// The process server's shipped example parses; the post-install runs
/// `init` into the directory the unit serves, with the arguments checked
/// here, and what that writes parses and keeps its keys private.
fn check_ps(root: &Path, control: &Path, packaged: &Path, tmp: &Path) {
    assert_config_valid(
        packaged,
        &root.join("usr/share/doc/lifeboat-ps/examples/ps.toml"),
    );
    let unit =
        std::fs::read_to_string(root.join("lib/systemd/system/lifeboat-ps.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/bin/lifeboat-ps serve --config /var/lib/lifeboat-ps/ps.toml")
    );
    assert!(unit.contains("User=lifeboat-ps"));
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    for want in [
        "DIR=/var/lib/lifeboat-ps",
        "USER=lifeboat-ps",
        "lifeboat-ps init --dir \"$DIR\"",
        "--listen \"${LIFEBOAT_PS_LISTEN:-0.0.0.0:9443}\"",
        "[ -e \"$DIR/kek.key\" ]",
    ] {
        assert!(postinst.contains(want), "postinst lacks {want}");
    }

    let dir = tmp.join("ps");
    let said = run_ok(
        Command::new(packaged)
            .args(["init", "--listen", "0.0.0.0:9443", "--dir"])
            .arg(&dir),
        STEP_TIMEOUT,
    )
    .unwrap();
    let kek = std::fs::read_to_string(dir.join("kek.key")).unwrap();
    assert!(
        said.contains("kek.key") && !said.contains(kek.trim()),
        "{said}"
    );
    use std::os::unix::fs::PermissionsExt;
    for secret in ["kek.key", "ca.key", "server.key"] {
        let mode = std::fs::metadata(dir.join(secret))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{secret} is mode {mode:o}");
    }
    assert_config_valid(packaged, &dir.join("ps.toml"));
}

/// The post-install runs `init` only without ps.toml and kek.key; `init`
/// itself refuses too, so that no path replaces the key the store was
/// written with.
#[test]
fn init_refuses_to_replace_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ps");
    let init = || {
        run_timeout(
            Command::new(bin("lifeboat-ps"))
                .args(["init", "--dir"])
                .arg(&dir),
            STEP_TIMEOUT,
        )
        .unwrap()
    };
    assert!(init().status.success());
    let kek = std::fs::read(dir.join("kek.key")).unwrap();
    let again = init();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("ps.toml already exists"));
    std::fs::remove_file(dir.join("ps.toml")).unwrap();
    let without_config = init();
    let err = String::from_utf8_lossy(&without_config.stderr);
    assert!(!without_config.status.success(), "init replaced the keys");
    assert!(err.contains("kek.key already exists"), "{err}");
    assert_eq!(std::fs::read(dir.join("kek.key")).unwrap(), kek);
}
