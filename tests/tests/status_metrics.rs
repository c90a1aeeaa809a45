//! Status, metrics and alerts of the process server (issue 10, item 3):
//! `/metrics` parses as Prometheus text, `/status` is the data
//! `lifeboat-ps status --json` prints, requests without the token are
//! refused, a bad `[http]` stops the server at start with the reason, an RPO
//! breach raises an event (log, metric, webhook POST to a receiver on
//! 127.0.0.1) and clears it once, and a filling cache goes warning →
//! critical with backpressure and loses nothing.

use std::process::Command;
use std::time::Duration;

use lifeboat_tests::http::{self, WebhookSink};
use lifeboat_tests::*;

const MACHINE: &str = "machine-1";
const MIB: u64 = 1024 * 1024;

/// The document without what changes from one moment to the next.
fn steady(mut v: serde_json::Value) -> serde_json::Value {
    const MOVING: [&str; 7] = [
        "time",
        "rpo-seconds",
        "churn-mb-per-s",
        "free-bytes",
        "cache-free",
        "backlog-seconds",
        "seconds",
    ];
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                for k in MOVING {
                    m.remove(k);
                }
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

fn scrape(port: u16, token: &str) -> prometheus_parse::Scrape {
    let (code, body) = http::get(port, "/metrics", Some(token)).unwrap();
    assert_eq!(code, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("/metrics is not Prometheus text: {e}\n{body}"))
}

/// The value of `name` with these labels, if present.
fn sample(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[test]
fn status_and_metrics_show_the_same_data_behind_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (mut ps, mut agent) = configured_pair(root, &[("root", 64 * MIB)], "").unwrap();
    ps.proc.as_mut().unwrap().stop(Duration::from_secs(10));
    let port = http::enable_http(&ps, "[alerts]\nrpo-alert = \"10m\"\n");
    ps.start().unwrap();
    let token = http::token(&ps);
    agent.start().unwrap();
    agent.wait_synced(Duration::from_secs(120)).unwrap();
    qemu_io(&agent.uri("root"), &["write -P 0x33 0 2M", "flush"]).unwrap();
    let seq = agent.tag().unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], seq, Duration::from_secs(120)).unwrap();

    // No token, a wrong one: 401.
    for t in [None, Some("wrong")] {
        for path in ["/status", "/metrics"] {
            let (code, _) = http::get(port, path, t).unwrap();
            assert_eq!(code, 401, "{path} with {t:?}");
        }
    }

    // /status is what the CLI prints (but for what moves with time), once
    // the point is in both.
    wait_for("the point in the status", Duration::from_secs(30), || {
        let st = http::status(port, &token).ok()?;
        let m = &st["machines"][0];
        (m["last-points"].as_array()?.iter().any(|p| p["seq"] == seq)
            && m["backlog"]["entries"] == 0)
            .then_some(st)
    })
    .unwrap();
    // Taken one after the other: retried until nothing moved in between.
    let mut last = (serde_json::Value::Null, serde_json::Value::Null);
    let st = wait_for("HTTP and CLI to agree", Duration::from_secs(30), || {
        let (h, c) = (http::status(port, &token).ok()?, ps.status_json());
        let same = steady(h.clone()) == steady(c.clone());
        last = (h.clone(), c);
        same.then_some(h)
    })
    .unwrap_or_else(|e| panic!("{e}: HTTP {}\nCLI {}", last.0, last.1));
    let m = &st["machines"][0];
    assert_eq!(m["machine"], MACHINE);
    assert_eq!(m["state"], "streaming", "{st}");
    assert_eq!(m["connected"], true);
    assert_eq!(m["owner"], st["server-id"]);
    assert_eq!(m["rpo-alert-seconds"], 600.0);
    assert_eq!(m["disks"][0]["id"], "root");
    // Health follows the cache filesystem's free space, which is the host's
    // here: ok from 30 % free, a warning naming it below.
    let free = st["health"]["cache-free"].as_f64().unwrap();
    if free >= 0.30 {
        assert_eq!(st["health"]["level"], "ok", "{st}");
    } else {
        assert_ne!(st["health"]["level"], "ok", "{st}");
        assert!(
            st["health"]["reasons"][0]
                .as_str()
                .unwrap()
                .starts_with("cache free"),
            "{st}"
        );
    }
    if free >= 0.22 {
        assert!(st["health"]["backpressure"].is_null(), "{st}");
    }
    let level = st["health"]["level"].as_str().unwrap().to_string();
    let level_number = match level.as_str() {
        "ok" => 0.0,
        "warning" => 1.0,
        _ => 2.0,
    };

    // /metrics parses and says the same.
    let s = scrape(port, &token);
    let mm = [("machine", MACHINE)];
    assert_eq!(
        sample(
            &s,
            "lifeboat_machine_state",
            &[("machine", MACHINE), ("state", "streaming")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&s, "lifeboat_machine_uploaded_seq", &mm),
        m["uploaded"].as_f64()
    );
    assert!(sample(&s, "lifeboat_machine_rpo_seconds", &mm).is_some());
    assert!(sample(&s, "lifeboat_machine_last_point_timestamp_seconds", &mm).unwrap() > 1e9);
    if free >= 0.22 {
        assert_eq!(sample(&s, "lifeboat_backpressure", &[]), Some(0.0));
    }
    assert_eq!(sample(&s, "lifeboat_health_level", &[]), Some(level_number));
    assert!(s.docs.contains_key("lifeboat_alert_active"));

    // The text form names the machine, its state and the point.
    let text = ps.status(false).unwrap();
    assert!(
        text.contains(&format!("machine {MACHINE}: streaming")),
        "{text}"
    );
    assert!(text.contains(&format!("point {seq} ")), "{text}");
    assert!(text.contains(&format!("health: {level}")), "{text}");
    eprintln!("lifeboat-ps status:\n{text}");

    // The status page, in a browser: the machine with its state, its RPO
    // chart, its points; a screenshot for a person to look at.
    let (code, _) = http::get(port, "/", None).unwrap();
    assert_eq!(code, 401);
    let (code, html) = http::get(port, "/", Some(&token)).unwrap();
    assert_eq!(code, 200, "{html}");
    let shot = artifact_dir().join("status-page.png");
    let dom = http::chromium_dom(
        &format!("http://127.0.0.1:{port}/?token={token}"),
        &root.join("chromium"),
        Some(&shot),
    )
    .unwrap();
    for want in [
        format!(r#"<tr class="machine" data-machine="{MACHINE}" data-state="streaming">"#),
        format!(r#"<svg class="rpo-chart" data-machine="{MACHINE}""#),
        format!(r#"<tr class="point" data-seq="{seq}">"#),
        format!(r#"<p id="health" data-level="{level}">"#),
        r#"<tr class="disk" data-machine="machine-1" data-disk="root">"#.to_string(),
    ] {
        assert!(dom.contains(&want), "no {want} in the page's DOM:\n{dom}");
    }
    eprintln!("status page screenshot: {}", shot.display());
    agent.stop_clean();

    // A bad [http] stops the server at start, saying why.
    ps.proc.as_mut().unwrap().stop(Duration::from_secs(10));
    let cfg_path = ps.dir.join("ps.toml");
    let good = std::fs::read_to_string(&cfg_path).unwrap();
    let serve = |cfg: &str| {
        std::fs::write(&cfg_path, cfg).unwrap();
        let o = run_timeout(
            Command::new(bin("lifeboat-ps"))
                .args(["serve", "--config"])
                .arg(&cfg_path),
            Duration::from_secs(30),
        )
        .unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = busy.local_addr().unwrap().port();
    let e = serve(&good.replace(&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{taken}")));
    assert!(
        e.contains(&format!("listening for HTTP on 127.0.0.1:{taken}")),
        "{e}"
    );
    let e = serve(&good.replace(&format!("127.0.0.1:{port}"), "127.0.0.1:notaport"));
    assert!(e.contains("listen"), "{e}");
    let e = serve(&good.replace("token-file = \"http.token\"", "token-file = \"nope.token\""));
    assert!(e.contains("nope.token"), "{e}");
}

/// The store's filesystem fills: uploads fail and retry, the cache holds the
/// stream, the RPO passes its 2 s threshold and an `rpo` event is raised —
/// log line, metric, webhook POST — once; with room again it clears, once.
#[test]
fn an_rpo_breach_raises_an_event_and_calls_the_webhook() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let store_dir = root.join("store");
    let store_fs = SmallFs::mount(&store_dir, "96m");
    let store_url = format!("file://{}", store_dir.display());
    let mut ps = ProcessServer::init(&root.join("ps"), Some(&store_url), &[]).unwrap();
    let hook = WebhookSink::start();
    let port = http::enable_http(
        &ps,
        &format!(
            "[alerts]\nrpo-alert = \"1h\"\nwebhook = \"{}\"\n[[alerts.machine]]\nname = \"{MACHINE}\"\nrpo-alert = \"2s\"\n",
            hook.url()
        ),
    );
    ps.start().unwrap();
    let token = http::token(&ps);
    let mut agent = ps.synced_agent(&root.join("agent"), MACHINE, &[("root", 32 * MIB)]);
    let seq = agent.tag().unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], seq, Duration::from_secs(120)).unwrap();
    // Whatever the initial sync raised has cleared.
    wait_for("no active alert", Duration::from_secs(30), || {
        let st = http::status(port, &token).ok()?;
        st["alerts"].as_array()?.is_empty().then_some(())
    })
    .unwrap();
    let before = hook.events().len();

    // The store's filesystem is full: the next segments cannot be put.
    let filler = store_fs.fill("filler");
    qemu_io(&agent.uri("root"), &["write -P 0x44 1M 4M", "flush"]).unwrap();
    agent.wait_acked(Duration::from_secs(60)).unwrap();

    let raised = wait_for("the rpo webhook event", Duration::from_secs(60), || {
        hook.events()[before..]
            .iter()
            .find(|e| e["kind"] == "rpo" && e["event"] == "raised")
            .cloned()
    })
    .unwrap_or_else(|e| panic!("{e}; events {:?}; log:\n{}", hook.events(), ps.log()));
    assert_eq!(raised["machine"], MACHINE);
    let msg = raised["message"].as_str().unwrap();
    assert!(msg.contains("over its threshold 2s"), "{msg}");
    let st = http::status(port, &token).unwrap();
    assert!(
        st["machines"][0]["rpo-seconds"].as_f64().unwrap() > 2.0,
        "{st}"
    );
    assert!(
        st["machines"][0]["backlog"]["entries"].as_u64().unwrap() > 0,
        "{st}"
    );
    assert!(
        st["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "rpo"),
        "{st}"
    );
    let rpo_active = |s: &prometheus_parse::Scrape| {
        sample(
            s,
            "lifeboat_alert_active",
            &[("machine", MACHINE), ("kind", "rpo")],
        )
    };
    let s = scrape(port, &token);
    assert_eq!(rpo_active(&s), Some(1.0));
    assert!(sample(&s, "lifeboat_alert_events_total", &[("kind", "rpo")]).unwrap() >= 1.0);
    assert!(ps.log().contains("ALERT raised"), "{}", ps.log());
    // Raised once, not on every tick.
    std::thread::sleep(Duration::from_secs(3));
    let rpo_events = |ev: &str| {
        hook.events()[before..]
            .iter()
            .filter(|e| e["kind"] == "rpo" && e["event"] == ev)
            .count()
    };
    assert_eq!(rpo_events("raised"), 1, "{:?}", hook.events());

    // Room again: the uploads go through, the alert clears, once.
    std::fs::remove_file(&filler).unwrap();
    wait_for("the rpo alert to clear", Duration::from_secs(120), || {
        (rpo_events("cleared") == 1).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; events {:?}; log:\n{}", hook.events(), ps.log()));
    assert_eq!(rpo_active(&scrape(port, &token)), None);
    assert_eq!(rpo_events("raised"), 1);
    let last = agent.tag().unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], last, Duration::from_secs(120)).unwrap();
    let out = ps.failover_ok(MACHINE, "latest", &root.join("out"));
    assert_same(&out.join("root.raw"), &agent.image("root"));
    agent.stop_clean();
    drop(ps);
    drop(store_fs);
}

/// The cache's filesystem fills (something else takes it): below 30 % free
/// the health is `warning`; below 20 % `critical` with backpressure — new
/// writes are refused, not acknowledged, kept by the agent; a webhook that
/// cannot be reached is logged with its URL and never blocks anything. With
/// room again everything is acknowledged and the recovered disk is the
/// source byte for byte.
#[test]
fn a_filling_cache_warns_then_applies_backpressure_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut ps = ProcessServer::init(&root.join("ps"), None, &[]).unwrap();
    let cache_dir = ps.dir.join("cache");
    let fs = SmallFs::mount(&cache_dir, "512m");
    // Nothing listens on this port: every POST fails.
    let dead = free_port();
    let port = http::enable_http(
        &ps,
        &format!(
            "[alerts]\nwebhook = \"http://127.0.0.1:{dead}/hook\"\nwebhook-timeout = \"1s\"\n"
        ),
    );
    ps.start().unwrap();
    let token = http::token(&ps);
    let mut agent = ps.synced_agent(&root.join("agent"), MACHINE, &[("root", 64 * MIB)]);
    let uri = agent.uri("root");
    qemu_io(&uri, &["write -P 0x11 0 4M", "flush"]).unwrap();
    agent.wait_acked(Duration::from_secs(60)).unwrap();
    let health = || http::status(port, &token).unwrap()["health"].clone();
    assert_eq!(health()["level"], "ok", "{}", health());

    // Leave `frac` of the filesystem free (the filler grows or shrinks).
    let filler = fs.0.join("filler");
    let leave = |frac: f64| {
        let have = std::fs::metadata(&filler).map(|m| m.len()).unwrap_or(0);
        let target = (fs.total() as f64 * frac) as u64;
        let len = (fs.free() + have).saturating_sub(target);
        std::fs::write(&filler, vec![0u8; len as usize]).unwrap();
    };
    leave(0.27);
    let h = wait_for("health warning", Duration::from_secs(30), || {
        let h = health();
        (h["level"] == "warning").then_some(h)
    })
    .unwrap_or_else(|e| panic!("{e}: {}", health()));
    let reasons = h["reasons"].to_string();
    assert!(reasons.contains("< 30%"), "{h}");
    assert!(h["backpressure"].is_null(), "{h}");

    leave(0.15);
    let h = wait_for("backpressure", Duration::from_secs(30), || {
        let h = health();
        (!h["backpressure"].is_null()).then_some(h)
    })
    .unwrap_or_else(|e| panic!("{e}: {}", health()));
    assert_eq!(h["level"], "critical", "{h}");
    let bp = h["backpressure"].as_str().unwrap();
    assert!(bp.contains("< 20%"), "{h}");
    let s = scrape(port, &token);
    assert_eq!(sample(&s, "lifeboat_backpressure", &[]), Some(1.0));
    assert_eq!(sample(&s, "lifeboat_health_level", &[]), Some(2.0));
    let text = ps.status(false).unwrap();
    assert!(
        text.contains("health: critical") && text.contains("backpressure: cache free"),
        "{text}"
    );

    // The agent keeps writing; nothing more is acknowledged, and it is told why.
    let mut rng = Rng(0xbac4_9e55);
    let data = root.join("data.bin");
    std::fs::File::create(&data)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    fill_random(&data, 0, 8 * MIB, &mut rng);
    let acked_before = agent.status().unwrap()["positions"]["acked"]
        .as_u64()
        .unwrap();
    qemu_io(
        &uri,
        &[&format!("write -s {} 16M 8M", data.display()), "flush"],
    )
    .unwrap();
    let while_bp = agent.tag().unwrap();
    let image = root.join("while-backpressure.img");
    snapshot(&agent.image("root"), &image);
    wait_for(
        "the agent to name the backpressure",
        Duration::from_secs(60),
        || {
            let s = agent.status().ok()?;
            s["last-error"]
                .as_str()?
                .contains("backpressure")
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}\nlog:\n{}", agent.status().ok(), ps.log()));
    std::thread::sleep(Duration::from_secs(2));
    let acked = agent.status().unwrap()["positions"]["acked"]
        .as_u64()
        .unwrap();
    assert_eq!(acked, acked_before, "acknowledged under backpressure");
    wait_for(
        "the failed webhook in the log",
        Duration::from_secs(30),
        || {
            ps.log()
                .contains(&format!(
                    "webhook POST to http://127.0.0.1:{dead}/hook failed"
                ))
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}:\n{}", ps.log()));

    // Room again: the agent's kept writes are acknowledged and stored.
    std::fs::remove_file(&filler).unwrap();
    agent
        .wait_acked(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", ps.log()));
    wait_for("health ok", Duration::from_secs(30), || {
        let h = health();
        (h["level"] == "ok" && h["backpressure"].is_null()).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}", health()));
    let last = agent.tag().unwrap();
    wait_stored(&ps.store_url, MACHINE, &[], last, Duration::from_secs(120)).unwrap();
    let out = ps.failover_ok(MACHINE, &while_bp.to_string(), &root.join("out-bp"));
    assert_same(&out.join("root.raw"), &image);
    let out = ps.failover_ok(MACHINE, "latest", &root.join("out-latest"));
    assert_same(&out.join("root.raw"), &agent.image("root"));
    agent.stop_clean();
    drop(ps);
    drop(fs);
}
