//! Registration with a passphrase, as an operator does it: `lifeboat-ps init`
//! makes the passphrase, `lifeboat-agent register` gets the machine a
//! certificate over the process server's TLS port, replication with it
//! recovers byte for byte; a wrong passphrase, a used one-time passphrase and
//! another machine's certificate are refused by name; `lifeboat-ps machines
//! remove` ends the machine's session and its certificate is refused from
//! then on; no passphrase or key reaches a log; the control socket admits
//! only its owner.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use lifeboat_tests::*;

const MIB: u64 = 1024 * 1024;

fn register(agent: &Agent, pass_file: &Path) -> Output {
    run_timeout(
        Command::new(bin("lifeboat-agent"))
            .args(["register", "--config"])
            .arg(&agent.config)
            .arg("--passphrase-file")
            .arg(pass_file),
        Duration::from_secs(60),
    )
    .unwrap()
}

fn machines(ps: &ProcessServer, args: &[&str]) -> Output {
    run_timeout(
        Command::new(bin("lifeboat-ps"))
            .arg("machines")
            .args(args)
            .arg("--config")
            .arg(ps.dir.join("ps.toml")),
        Duration::from_secs(30),
    )
    .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// An agent of `machine` whose certificate files do not exist yet.
fn unregistered(root: &Path, machine: &str, port: u16, size: u64) -> Agent {
    let dir = root.join(machine);
    Agent::configure(
        &dir,
        machine,
        &dir.join("certs"),
        port,
        &[("root", size)],
        "",
    )
    .unwrap()
}

#[test]
fn registered_machines_replicate_and_removed_ones_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let size = 16 * MIB;
    let mut ps = ProcessServer::init(&root.join("ps"), None, &[]).unwrap();
    ps.start().unwrap();
    let standing = std::fs::read_to_string(ps.dir.join("registration/passphrase")).unwrap();
    let standing = standing.trim().to_string();
    assert_eq!(standing.len(), 29, "{standing:?}");

    // A wrong passphrase: refused by name, nothing written.
    let mut web = unregistered(root, "web-1", ps.port, size);
    let wrong = root.join("wrong.pass");
    std::fs::write(&wrong, "ABCDE-FGHJK-MNPQR-STVWX-YZ012\n").unwrap();
    let o = register(&web, &wrong);
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(
        msg.contains("refused to register machine web-1") && msg.contains("passphrase"),
        "{msg}"
    );
    assert!(!web.dir.join("certs/client.key").exists());

    // The right one, typed in lower case with spaces.
    let right = root.join("right.pass");
    std::fs::write(&right, standing.to_lowercase().replace('-', " ")).unwrap();
    let o = register(&web, &right);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("registered machine web-1"),
        "{}",
        text(&o)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(web.dir.join("certs/client.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the key is private: {mode:o}");
    // Registering again is refused locally: the machine has a certificate.
    let again = register(&web, &right);
    assert!(!again.status.success());
    assert!(text(&again).contains("already exists"), "{}", text(&again));

    // The certificate replicates; the replica is the disk, byte for byte.
    fill_random(&web.image("root"), 0, size, &mut Rng(0x5e9));
    web.start().unwrap();
    web.wait_synced(Duration::from_secs(120)).unwrap();
    qemu_io(
        &web.uri("root"),
        &["write -P 0x5a 4095 3000", "write -P 0xa5 8M 1M", "flush"],
    )
    .unwrap();
    let seq = web.tag().unwrap();
    wait_stored(&ps.store_url, "web-1", &[], seq, Duration::from_secs(60)).unwrap();
    let out = ps.failover_ok("web-1", &seq.to_string(), &root.join("out"));
    assert_same(&out.join("root.raw"), &web.image("root"));

    // A one-time passphrase registers one machine, once.
    let o = machines(&ps, &["one-time-passphrase"]);
    assert!(o.status.success(), "{}", text(&o));
    let once = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let once_file = root.join("once.pass");
    std::fs::write(&once_file, &once).unwrap();
    let db1 = unregistered(root, "db-1", ps.port, size);
    let o = register(&db1, &once_file);
    assert!(o.status.success(), "{}", text(&o));
    let db2 = unregistered(root, "db-2", ps.port, size);
    let o = register(&db2, &once_file);
    assert!(!o.status.success(), "a used one-time passphrase is refused");
    assert!(
        text(&o).contains("already used (by machine db-1"),
        "{}",
        text(&o)
    );

    // web-1's certificate cannot send db-1's stream.
    let mut impostor = Agent::configure(
        &root.join("impostor"),
        "db-1",
        &web.dir.join("certs"),
        ps.port,
        &[("root", size)],
        "",
    )
    .unwrap();
    impostor.start().unwrap();
    let refused = wait_for(
        "the impostor to be refused",
        Duration::from_secs(30),
        || {
            let log = ps.log();
            log.contains("machine \"db-1\" is not allowed by the client certificate")
                .then_some(())
        },
    );
    impostor.proc.as_mut().unwrap().kill9();
    refused.unwrap_or_else(|e| panic!("{e}\nPS log:\n{}", ps.log()));

    // Removal: the live session ends and the certificate is refused from
    // then on; the history stays recoverable.
    let o = machines(&ps, &["remove", "web-1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("live session on the running server was ended"),
        "{}",
        text(&o)
    );
    wait_for(
        "the removed machine's handshake to be refused",
        Duration::from_secs(60),
        || ps.log().contains("Revoked").then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\nPS log:\n{}", ps.log()));
    // The agent says why it cannot connect.
    let status = wait_for(
        "the agent to report the revocation",
        Duration::from_secs(30),
        || {
            let st = web.status().ok()?;
            (st["connected"] == false
                && st["last-error"]
                    .as_str()
                    .is_some_and(|e| e.contains("it is revoked")))
            .then_some(st)
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {}", web.status().unwrap()));
    assert!(
        status["last-error"]
            .as_str()
            .unwrap()
            .contains("lifeboat-agent register"),
        "{status}"
    );
    let list = machines(&ps, &["list"]);
    let list = text(&list);
    let web_line = list.lines().find(|l| l.starts_with("web-1")).unwrap();
    assert!(web_line.contains("removed"), "{list}");
    assert!(
        list.lines()
            .any(|l| l.starts_with("machine-1") && l.contains("active") && l.contains("init")),
        "{list}"
    );
    let o = machines(&ps, &["remove", "web-1"]);
    assert!(
        !o.status.success() && text(&o).contains("already removed"),
        "{}",
        text(&o)
    );
    std::fs::remove_dir_all(root.join("out")).unwrap();
    ps.failover_ok("web-1", &seq.to_string(), &root.join("out"));
    assert_same(&root.join("out/root.raw"), &{
        // The disk as it was at `seq`: nothing was written to it after.
        web.image("root")
    });

    // A removed machine registers again with a new passphrase after its old
    // files are moved away; the new certificate replicates.
    web.proc.as_mut().unwrap().kill9();
    let rotated = machines(&ps, &["rotate-passphrase"]);
    assert!(rotated.status.success(), "{}", text(&rotated));
    let new_pass = String::from_utf8_lossy(&rotated.stdout).trim().to_string();
    let o = register(&unregistered(root, "app-1", ps.port, size), &right);
    assert!(!o.status.success(), "the rotated-out passphrase is refused");
    std::fs::remove_dir_all(web.dir.join("certs")).unwrap();
    let new_file = root.join("new.pass");
    std::fs::write(&new_file, &new_pass).unwrap();
    let o = register(&web, &new_file);
    assert!(o.status.success(), "{}", text(&o));
    web.start().unwrap();
    qemu_io(&web.uri("root"), &["write -P 0x33 1M 64k", "flush"]).unwrap();
    let seq2 = web.tag().unwrap();
    wait_stored(&ps.store_url, "web-1", &[], seq2, Duration::from_secs(60)).unwrap();
    ps.failover_ok("web-1", &seq2.to_string(), &root.join("out2"));
    assert_same(&root.join("out2/root.raw"), &web.image("root"));
    let agent_logs: String = [&web, &db1, &db2, &impostor]
        .iter()
        .filter_map(|a| a.proc.as_ref().map(|p| p.log_text()))
        .collect();
    web.stop_clean();

    // No passphrase, and no key, in any log.
    let mut logs = ps.log();
    logs.push_str(&agent_logs);
    let kek = std::fs::read_to_string(ps.kek()).unwrap();
    let ca_key = std::fs::read_to_string(ps.dir.join("ca.key")).unwrap();
    let client_key = std::fs::read_to_string(web.dir.join("certs/client.key")).unwrap();
    for (what, secret) in [
        ("the standing passphrase", standing.as_str()),
        ("the rotated passphrase", new_pass.as_str()),
        ("the one-time passphrase", once.as_str()),
        ("the key-encryption key", kek.trim()),
    ] {
        assert!(!logs.contains(secret), "{what} is in a log");
        let plain: String = secret.chars().filter(|c| *c != '-').collect();
        assert!(!logs.contains(&plain), "{what} is in a log");
    }
    for (what, pem) in [("the CA key", &ca_key), ("the machine key", &client_key)] {
        let body = pem.lines().nth(1).unwrap();
        assert!(!logs.contains(body), "{what} is in a log");
    }
    assert!(logs.contains("registered machine web-1"), "{logs}");
}

#[test]
fn the_control_socket_and_registry_admit_only_their_owner() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ps = ProcessServer::init(&tmp.path().join("ps"), None, &[]).unwrap();
    ps.start().unwrap();
    use std::os::unix::fs::PermissionsExt;
    for f in [
        "cache/control.sock",
        "registration/passphrase",
        "registration/registry.json",
        "registration/revoked.crl",
    ] {
        let mode = std::fs::metadata(ps.dir.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{f} is {mode:o}");
    }
    if !have("python3") || unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping the other-user connect: needs root and python3");
        return;
    }
    // Another user (nobody) cannot reach the control socket.
    use std::os::unix::process::CommandExt;
    let sock = ps.dir.join("cache/control.sock");
    let o = run_timeout(
        Command::new("python3")
            .arg("-c")
            .arg(
                "import socket,sys\ns=socket.socket(socket.AF_UNIX)\n\
                 try:\n  s.connect(sys.argv[1]); s.sendall(b'{\"cmd\":\"status\"}\\n'); print('CONNECTED', s.recv(100))\n\
                 except PermissionError as e:\n  print('REFUSED', e)\n",
            )
            .arg(&sock)
            .uid(65534)
            .gid(65534),
        Duration::from_secs(30),
    )
    .unwrap();
    let out = text(&o);
    assert!(out.contains("REFUSED"), "{out}");
}

/// A server that shows the process server's certificate (its key stolen,
/// say) but does not know the passphrase: whatever it answers, the agent
/// writes nothing and says why. Its reply carries a certificate and CA of
/// its own and a proof it could not compute.
#[test]
fn an_impostor_server_without_the_passphrase_gets_nothing_written() {
    use lifeboat_common::register::{self as reg, Message, Reply};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let ps = ProcessServer::init(&root.join("ps"), None, &[]).unwrap();
    let port = free_port();
    let rt = tokio::runtime::Runtime::new().unwrap();
    lifeboat_common::tls::install_crypto_provider();
    let cfg = lifeboat_common::tls::server_config_revocable(
        &ps.dir.join("ca.pem"),
        &ps.dir.join("server.pem"),
        &ps.dir.join("server.key"),
        &ps.dir.join("registration/revoked.crl"),
        true,
    )
    .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
        .unwrap();
    let impostor = rt.spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(cfg)
            .accept(tcp)
            .await
            .unwrap();
        let Message::Register(q) = reg::read_message(&mut tls).await.unwrap() else {
            panic!("expected a registration request")
        };
        // A guess at the passphrase: the reply's proof cannot match.
        let guess = reg::passphrase_key("AAAAA-AAAAA").unwrap();
        let reply = Reply::new(
            &guess,
            &[0; 32],
            &q,
            "not a certificate".into(),
            "not a CA".into(),
        );
        reg::write_message(&mut tls, &Message::Registered(reply))
            .await
            .unwrap();
        q.machine
    });
    let agent = unregistered(root, "web-1", port, MIB);
    let pass = root.join("pass");
    std::fs::write(
        &pass,
        std::fs::read(ps.dir.join("registration/passphrase")).unwrap(),
    )
    .unwrap();
    let o = register(&agent, &pass);
    let asked_for = rt.block_on(impostor).unwrap();
    assert_eq!(asked_for, "web-1");
    assert!(!o.status.success());
    assert!(
        text(&o).contains("without proof that it knows the passphrase"),
        "{}",
        text(&o)
    );
    for f in ["ca.pem", "client.pem", "client.key"] {
        assert!(!agent.dir.join("certs").join(f).exists(), "{f} was written");
    }

    // Without its revocation list the listener refuses to start, naming it:
    // moving the list away must not bring removed machines back.
    std::fs::remove_file(ps.dir.join("registration/revoked.crl")).unwrap();
    let e = lifeboat_common::tls::server_config_revocable(
        &ps.dir.join("ca.pem"),
        &ps.dir.join("server.pem"),
        &ps.dir.join("server.key"),
        &ps.dir.join("registration/revoked.crl"),
        true,
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("revoked.crl"), "{e:#}");
}
