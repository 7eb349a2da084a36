//! `asya-host up` end to end, through the real binary: the README's example pipeline, a
//! runtime killed mid-run, Ctrl-C, and the errors a newcomer can hit.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use asya_test_support::{free_port, plugin, poll_until, repo_root, wait_output};
use rustix::process::{kill_process, test_kill_process, Pid, Signal};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_asya-host");

/// `asya-host up ARGS` from the repository root with TMPDIR in `tmp`.
fn up(tmp: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("up")
        .args(args)
        .current_dir(repo_root())
        .env("TMPDIR", tmp)
        .env_remove("ASYA_LOG_LEVEL")
        .env_remove("RUST_LOG")
        .env_remove("ASYA_PYTHONEXECUTABLE")
        .stdin(Stdio::null());
    c
}

/// Run to completion within `limit`; killed otherwise.
fn run(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("asya-host starts");
    wait_output(child, limit)
}

fn results(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a result line is JSON"))
        .collect()
}

/// The last line of stderr, which must be the one error line.
fn error_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    assert!(
        last.starts_with("asya-host: "),
        "last stderr line is not the error: {err}"
    );
    last.to_owned()
}

/// Nothing of the run is left in its TMPDIR (sockets, runtime file).
fn assert_clean(tmp: &Path) {
    let left: Vec<_> = std::fs::read_dir(tmp)
        .expect("tmp")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| !p.starts_with(tmp.join("flow")))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

fn alive(pid: i32) -> bool {
    Pid::from_raw(pid).is_some_and(|p| test_kill_process(p).is_ok())
}

/// A flow in `dir/flow` with a handler module `h.py`.
fn write_flow(dir: &Path, flow: &str, handlers: &str) -> PathBuf {
    let d = dir.join("flow");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("flow.toml"), flow).unwrap();
    std::fs::write(d.join("h.py"), handlers).unwrap();
    d.join("flow.toml")
}

#[test]
fn readme_command_runs_the_example_pipeline() {
    plugin("priority-router");
    let tmp = tempfile::tempdir().unwrap();
    // Exactly the README's first command, with this test's binary instead of `cargo run`
    // (a nested cargo would wait for the lock this test run holds).
    let mut cmd = Command::new("bash");
    cmd.arg("examples/run.sh")
        .current_dir(repo_root())
        .env("ASYA_HOST_BIN", BIN)
        .env("TMPDIR", tmp.path())
        .env_remove("ASYA_LOG_LEVEL")
        .env_remove("RUST_LOG")
        .env_remove("ASYA_PYTHONEXECUTABLE")
        .stdin(Stdio::null());
    let out = run(cmd, Duration::from_secs(300));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{stderr}", out.status);
    let lines = results(&out.stdout);
    assert_eq!(lines.len(), 20, "{stderr}");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["line"], i + 1, "results in input order: {l}");
        assert_eq!(l["status"], "succeeded", "{l}");
    }
    // r02 is angry: the priority-router policy sent it through `escalate`.
    let r02 = lines[1]["result"].to_string();
    assert!(r02.contains("\"ticket\":\"T-"), "{r02}");
    // r01 is happy: no ticket; it fanned out to two aspects.
    let r01 = &lines[0]["result"];
    assert_eq!(r01.as_array().map(Vec::len), Some(2), "{r01}");
    assert!(r01.to_string().contains("\"ticket\":null"), "{r01}");
    // The summary table names every actor.
    for actor in [
        "parse",
        "sentiment",
        "escalate",
        "aspects",
        "tally",
        "x-sink",
    ] {
        assert!(
            stderr.lines().any(|l| l.starts_with(actor)),
            "{actor}: {stderr}"
        );
    }
    assert!(
        stderr.contains("20 tasks: 20 succeeded, 0 failed"),
        "{stderr}"
    );
    assert_clean(tmp.path());
}

const SLOW_FLOW: &str = r#"
namespace = "kill"
[actors.slow]
handler = "h.work"
max_attempts = 5
[actors.done]
handler = "h.done"
[flows]
f = ["slow", "done"]
"#;

const SLOW_HANDLERS: &str = r#"
import os, time
PIDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pids")

def work(p):
    with open(PIDS, "a") as f:
        f.write("%d\n" % os.getpid())
    time.sleep(0.05)
    return {"n": p["n"], "pid": os.getpid()}

def done(p):
    return p
"#;

fn pids(flow_dir: &Path) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_to_string(flow_dir.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[test]
fn killed_runtime_is_restarted_and_the_run_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let flow = write_flow(tmp.path(), SLOW_FLOW, SLOW_HANDLERS);
    let input = tmp.path().join("flow/in.jsonl");
    let lines: String = (0..40).map(|n| format!("{{\"n\": {n}}}\n")).collect();
    std::fs::write(&input, lines).unwrap();
    let child = up(
        tmp.path(),
        &[
            flow.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--flow",
            "f",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("asya-host starts");
    let flow_dir = tmp.path().join("flow");
    // Kill the runtime once it has started working.
    assert!(
        poll_until(Duration::from_secs(60), || !pids(&flow_dir).is_empty()),
        "the runtime never ran"
    );
    let first = pids(&flow_dir)[0];
    kill_process(Pid::from_raw(first).unwrap(), Signal::KILL).expect("kill the runtime");
    let out = wait_output(child, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let res = results(&out.stdout);
    assert_eq!(res.len(), 40, "{stderr}");
    for r in &res {
        // Retried to success, or in x-sump with its reason.
        let ok = r["status"] == "succeeded"
            || (r["status"] == "failed" && r["error"]["message"].is_string());
        assert!(ok, "{r}");
    }
    assert!(
        res.iter()
            .any(|r| r["status"] == "succeeded" && r["result"]["pid"] != first),
        "a restarted runtime did work"
    );
    assert!(stderr.contains("runtime exited; restarting it"), "{stderr}");
    assert!(stderr.contains("runtime restarts: slow ×1"), "{stderr}");
    let all = pids(&flow_dir);
    assert!(all.len() >= 2, "{all:?}");
    for p in all {
        assert!(!alive(p), "runtime {p} survived");
    }
    assert_clean(tmp.path());
}

/// Lines of a child's stderr, as they come.
fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let err = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn http(addr: &str, request: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the gateway");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn serves_the_gateway_and_stops_cleanly_on_ctrl_c() {
    let tmp = tempfile::tempdir().unwrap();
    let flow = write_flow(tmp.path(), SLOW_FLOW, SLOW_HANDLERS);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = up(
        tmp.path(),
        &[flow.to_str().unwrap(), "--gateway-addr", &addr],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("asya-host starts");
    let rx = stderr_lines(&mut child);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seen
        .iter()
        .any(|l: &String| l.contains("gateway on http://"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("no gateway line; stderr: {seen:#?}"),
        }
    }
    let body = r#"{"flow": "f", "payload": {"n": 7}}"#;
    let resp = http(
        &addr,
        &format!(
            "POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(resp.starts_with("HTTP/1.1 20"), "{resp}");
    let flow_dir = tmp.path().join("flow");
    assert!(
        poll_until(Duration::from_secs(30), || !pids(&flow_dir).is_empty()),
        "the task never reached the runtime"
    );
    let pid = Pid::from_raw(child.id() as i32).unwrap();
    kill_process(pid, Signal::INT).expect("SIGINT");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "asya-host did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    for p in pids(&flow_dir) {
        assert!(!alive(p), "runtime {p} survived");
    }
    assert_clean(tmp.path());
}

#[test]
fn missing_python_is_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let flow = write_flow(tmp.path(), SLOW_FLOW, SLOW_HANDLERS);
    let mut cmd = up(
        tmp.path(),
        &[flow.to_str().unwrap(), "--gateway-addr", "127.0.0.1:0"],
    );
    cmd.env("ASYA_PYTHONEXECUTABLE", "/nonexistent");
    let out = run(cmd, Duration::from_secs(60));
    assert!(!out.status.success());
    let line = error_line(&out);
    assert!(line.contains("\"/nonexistent\""), "{line}");
    assert!(line.contains("ASYA_PYTHONEXECUTABLE"), "{line}");
    assert_clean(tmp.path());
}

#[test]
fn handler_import_error_is_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let flow = write_flow(
        tmp.path(),
        "[actors.a]\nhandler = \"h.work\"\n[actors.b]\nhandler = \"nosuchmodule.f\"\n",
        "def work(p):\n    return p\n",
    );
    let out = run(
        up(
            tmp.path(),
            &[flow.to_str().unwrap(), "--gateway-addr", "127.0.0.1:0"],
        ),
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    let line = error_line(&out);
    assert!(line.contains("actor b:"), "{line}");
    assert!(line.contains("no module named 'nosuchmodule'"), "{line}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_clean(tmp.path());
}

#[test]
fn bad_flow_file_names_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let flow = write_flow(
        tmp.path(),
        "namespace = \"n\"\n[actors.a]\nhandler = \"h.work\"\nconcurency = 2\n",
        "",
    );
    let out = run(
        up(tmp.path(), &[flow.to_str().unwrap()]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    let line = error_line(&out);
    assert!(line.contains("flow.toml:4:"), "{line}");
    assert!(line.contains("unknown field `concurency`"), "{line}");
}

#[test]
fn missing_policy_names_the_build_command() {
    let tmp = tempfile::tempdir().unwrap();
    let flow = write_flow(
        tmp.path(),
        "[actors.a]\nhandler = \"h.work\"\npolicies = [{ path = \"nope.wasm\" }]\n",
        "",
    );
    let out = run(
        up(tmp.path(), &[flow.to_str().unwrap()]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    let line = error_line(&out);
    assert!(line.contains("nope.wasm not found"), "{line}");
    assert!(
        line.contains(
            "cargo build --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release"
        ),
        "{line}"
    );
}

#[test]
fn port_in_use_is_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let flow = write_flow(tmp.path(), SLOW_FLOW, SLOW_HANDLERS);
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = run(
        up(
            tmp.path(),
            &[flow.to_str().unwrap(), "--gateway-addr", &addr],
        ),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    let line = error_line(&out);
    assert!(line.contains(&addr), "{line}");
    assert!(line.contains("in use"), "{line}");
    assert!(line.contains("--gateway-addr"), "{line}");
    assert_clean(tmp.path());
}

#[test]
fn runtime_timeout_restarts_the_runtime_and_the_run_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let flow = write_flow(
        tmp.path(),
        "[actors.a]\nhandler = \"h.work\"\ntimeout = \"1s\"\n[flows]\nf = [\"a\"]\n",
        "import time\n\ndef work(p):\n    if p.get(\"slow\"):\n        time.sleep(30)\n    return p\n",
    );
    let input = tmp.path().join("flow/in.jsonl");
    std::fs::write(&input, "{\"slow\": true}\n{\"n\": 1}\n{\"n\": 2}\n").unwrap();
    let out = run(
        up(
            tmp.path(),
            &[
                flow.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
                "--flow",
                "f",
            ],
        ),
        Duration::from_secs(90),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let res = results(&out.stdout);
    assert_eq!(res.len(), 3, "{stderr}");
    assert_eq!(res[0]["status"], "failed", "{}", res[0]);
    assert!(res[0]["error"]["message"].is_string(), "{}", res[0]);
    assert_eq!(res[1]["status"], "succeeded", "{}", res[1]);
    assert_eq!(res[2]["status"], "succeeded", "{}", res[2]);
    assert!(
        stderr.contains("restarting the runtime after a runtime timeout"),
        "{stderr}"
    );
    assert!(stderr.contains("1 failed"), "{stderr}");
    assert_clean(tmp.path());
}

/// Running (not gone, not a zombie waiting for a reaper).
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

#[test]
fn sigkill_of_up_kills_its_runtimes() {
    let tmp = tempfile::tempdir().unwrap();
    // Each runtime writes its pid when it imports the handler module.
    let handlers = r#"
import os
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pids"), "a") as f:
    f.write("%d\n" % os.getpid())

def work(p):
    return p
"#;
    let flow = write_flow(
        tmp.path(),
        "[actors.a]\nhandler = \"h.work\"\n[actors.b]\nhandler = \"h.work\"\n[flows]\nf = [\"a\", \"b\"]\n",
        handlers,
    );
    let mut child = up(
        tmp.path(),
        &[flow.to_str().unwrap(), "--gateway-addr", "127.0.0.1:0"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("asya-host starts");
    let rx = stderr_lines(&mut child);
    // The gateway line comes after every runtime is ready.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("gateway on http://"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("no gateway line; stderr: {seen:#?}"),
        }
    }
    let flow_dir = tmp.path().join("flow");
    let runtimes = pids(&flow_dir);
    assert_eq!(runtimes.len(), 2, "{runtimes:?}");
    assert!(runtimes.iter().all(|p| running(*p)), "{runtimes:?}");
    kill_process(Pid::from_raw(child.id() as i32).unwrap(), Signal::KILL).expect("SIGKILL up");
    child.wait().expect("reap up");
    let gone = poll_until(Duration::from_secs(10), || {
        runtimes.iter().all(|p| !running(*p))
    });
    let survivors: Vec<i32> = runtimes.iter().copied().filter(|p| running(*p)).collect();
    for p in &survivors {
        let _ = kill_process(Pid::from_raw(*p).unwrap(), Signal::KILL);
    }
    assert!(gone, "runtimes {survivors:?} survived a SIGKILL of up");
}

#[test]
fn output_routed_to_an_unknown_actor_goes_to_sump_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let flow = write_flow(
        tmp.path(),
        "[actors.a]\nhandler = \"h.to_ghost\"\nmode = \"envelope\"\n[actors.b]\nhandler = \"h.work\"\n[flows]\nf = [\"a\", \"b\"]\n",
        "def to_ghost(env):\n    env[\"route\"][\"next\"] = [\"ghost\"]\n    return env\n\ndef work(p):\n    return p\n",
    );
    let input = tmp.path().join("flow/in.jsonl");
    std::fs::write(&input, "{\"n\": 1}\n").unwrap();
    let started = Instant::now();
    let out = run(
        up(
            tmp.path(),
            &[
                flow.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
                "--flow",
                "f",
                "--timeout",
                "60s",
            ],
        ),
        Duration::from_secs(90),
    );
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let res = results(&out.stdout);
    assert_eq!(res.len(), 1, "{stderr}");
    assert_eq!(res[0]["status"], "failed", "{}", res[0]);
    let message = res[0]["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("actor \"ghost\" is not part of this mesh (known: a, b, x-sink, x-sump)"),
        "{}",
        res[0]
    );
    // At once: not after the task's 60 s deadline.
    assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
    assert_clean(tmp.path());
}

#[test]
fn non_retryable_errors_from_the_flow_file_go_to_sump_at_attempt_1() {
    let tmp = tempfile::tempdir().unwrap();
    let flow = write_flow(
        tmp.path(),
        r#"
[actors.a]
handler = "h.work"
max_attempts = 3
non_retryable_errors = ["BadInput"]
backoff_initial = "50ms"
backoff_max = "100ms"
[flows]
f = ["a"]
"#,
        r#"
import os
CALLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls")

class BadInput(Exception):
    pass

def work(p):
    with open(CALLS, "a") as f:
        f.write("%d\n" % p["n"])
    if p.get("bad"):
        raise BadInput("no good")
    raise ValueError("try again")
"#,
    );
    let input = tmp.path().join("flow/in.jsonl");
    std::fs::write(&input, "{\"n\": 1, \"bad\": true}\n{\"n\": 2}\n").unwrap();
    let mut cmd = up(
        tmp.path(),
        &[
            flow.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--flow",
            "f",
        ],
    );
    cmd.env("ASYA_RESILIENCY_NON_RETRYABLE_ERRORS", "SomethingElse");
    let out = run(cmd, Duration::from_secs(90));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let res = results(&out.stdout);
    assert_eq!(res.len(), 2, "{stderr}");
    for r in &res {
        assert_eq!(r["status"], "failed", "{r}");
    }
    assert_eq!(res[0]["error"]["type"], "h.BadInput", "{}", res[0]);
    assert_eq!(res[1]["error"]["type"], "ValueError", "{}", res[1]);
    let calls = std::fs::read_to_string(tmp.path().join("flow/calls")).unwrap();
    let count = |n: &str| calls.lines().filter(|l| *l == n).count();
    assert_eq!(
        count("1"),
        1,
        "the non-retryable error was retried: {calls}"
    );
    assert_eq!(
        count("2"),
        3,
        "the retryable error: max_attempts deliveries: {calls}"
    );
    // The variable `up` does not read is named, not silently ignored.
    assert!(
        stderr.contains("ASYA_RESILIENCY_NON_RETRYABLE_ERRORS is not read by `up`"),
        "{stderr}"
    );
    assert_clean(tmp.path());
}

const CONTROL_FLOW: &str = r#"
namespace = "ctl"
[actors.s1]
handler = "h.step"
[actors.s2]
handler = "h.step"
[actors.s3]
handler = "h.step"
[actors.ask]
handler = "h.ask"
[flows]
long = ["s1", "s2", "s3"]
review = ["ask", "s1"]
"#;

const CONTROL_HANDLERS: &str = r#"
import os, time
CALLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls")

def step(p):
    with open(CALLS, "a") as f:
        f.write("call\n")
    time.sleep(p.get("sleep", 0))
    return dict(p, steps=p.get("steps", 0) + 1)

def ask(p):
    return {"__asya_pause__": {"prompt": "ok?"}, "payload": dict(p, asked=True)}
"#;

/// One HTTP/1.1 request to the gateway at `addr`: (status, body).
fn gw_call(addr: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
    let resp = http(
        addr,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Issue #19 on the local mesh (`up`, memory transport): a cancel reaches the in-process
/// sidecars (at most one more runtime call), and a paused task resumes with the merged input.
#[test]
fn up_cancel_reaches_the_actors_and_a_paused_task_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let flow = write_flow(tmp.path(), CONTROL_FLOW, CONTROL_HANDLERS);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = up(
        tmp.path(),
        &[flow.to_str().unwrap(), "--gateway-addr", &addr],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("asya-host starts");
    let guard = ChildGuard(child.id());
    let rx = stderr_lines(&mut child);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains("gateway on http://") => break,
            Ok(_) => {}
            Err(_) => panic!("no gateway line"),
        }
    }
    let calls_file = tmp.path().join("flow/calls");
    let calls = || {
        std::fs::read_to_string(&calls_file)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    let (s, v) = gw_call(
        &addr,
        "POST",
        "/tasks",
        r#"{"flow": "long", "payload": {"sleep": 2}}"#,
    );
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert!(
        poll_until(Duration::from_secs(30), || {
            gw_call(&addr, "GET", &format!("/tasks/{id}"), "").1["actors_completed"] == 1
        }),
        "the first hop never finished"
    );
    let at_cancel = calls();
    let (s, v) = gw_call(&addr, "POST", &format!("/tasks/{id}/cancel"), "");
    assert_eq!((s, v["status"].as_str()), (200, Some("canceled")), "{v}");
    std::thread::sleep(Duration::from_secs(5));
    let total = calls();
    assert!(
        total <= at_cancel + 1 && total <= 2,
        "runtime calls: {at_cancel} at the cancel, {total} in all"
    );

    let (s, v) = gw_call(
        &addr,
        "POST",
        "/tasks",
        r#"{"flow": "review", "payload": {"n": 1}}"#,
    );
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert!(
        poll_until(Duration::from_secs(30), || {
            let (_, v) = gw_call(&addr, "GET", &format!("/tasks/{id}"), "");
            v["status"] == "paused" && v["pause_metadata"]["prompt"] == "ok?"
        }),
        "never paused"
    );
    // Parked asynchronously: a resume answers 409 until the frame is stored.
    let mut resumed = (0, Value::Null);
    assert!(
        poll_until(Duration::from_secs(10), || {
            resumed = gw_call(
                &addr,
                "POST",
                &format!("/tasks/{id}/resume"),
                r#"{"input": {"ok": true}}"#,
            );
            resumed.0 == 200
        }),
        "{resumed:?}"
    );
    assert!(
        poll_until(Duration::from_secs(30), || {
            gw_call(&addr, "GET", &format!("/tasks/{id}"), "").1["status"] == "succeeded"
        }),
        "the resumed task never succeeded"
    );
    let (_, v) = gw_call(&addr, "GET", &format!("/tasks/{id}"), "");
    assert_eq!(
        v["result"],
        serde_json::json!({"n": 1, "asked": true, "ok": true, "steps": 1})
    );
    let (s, _) = gw_call(
        &addr,
        "POST",
        &format!("/tasks/{id}/resume"),
        r#"{"input": {}}"#,
    );
    assert_eq!(s, 409);
    let pid = Pid::from_raw(child.id() as i32).unwrap();
    kill_process(pid, Signal::INT).expect("SIGINT");
    let status = wait_output(child, Duration::from_secs(30)).status;
    // Reaped: nothing left to kill (and its pid may be reused).
    std::mem::forget(guard);
    assert!(status.success(), "{status:?}");
}

/// Kills the `up` process (SIGKILL) if a test fails before stopping it.
struct ChildGuard(u32);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(pid) = Pid::from_raw(self.0 as i32) {
            if test_kill_process(pid).is_ok() {
                let _ = kill_process(pid, Signal::KILL);
            }
        }
    }
}
