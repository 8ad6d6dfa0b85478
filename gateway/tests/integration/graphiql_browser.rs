//! The GraphiQL page in a real headless browser (Debian's chromium, driven over the Chrome
//! DevTools Protocol): with no network beyond the server, the IDE renders, loads the schema
//! by introspection (the documentation explorer shows the root type), and runs a query whose
//! answer comes back in the result pane. `scripts/test.sh` installs chromium.

use crate::common::{client, shared};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tungstenite::Message;

type Socket = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>;

struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DevTools session on one page.
struct Page {
    socket: Socket,
    next: u64,
}

impl Page {
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        self.socket.send(Message::text(json!({"id": id, "method": method, "params": params}).to_string())).unwrap();
        loop {
            if let Message::Text(t) = self.socket.read().expect("devtools read") {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["id"] == id {
                    assert!(v.get("error").is_none(), "{method}: {v}");
                    return v["result"].clone();
                }
            }
        }
    }

    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({"expression": expression, "returnByValue": true}));
        r["result"]["value"].clone()
    }

    /// Evaluates `expression` until it is truthy.
    fn wait_for(&mut self, what: &str, expression: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.eval(expression);
            if !(v.is_null() || v == json!(false) || v == json!("")) {
                return v;
            }
            if Instant::now() > deadline {
                let body = self.eval("document.body ? document.body.innerText.slice(0, 2000) : ''");
                panic!("timed out waiting for {what}; the page shows: {body}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"].into_iter().find(|b| {
        Command::new(b).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    })
}

fn launch() -> (Browser, Page) {
    let bin = chromium().expect("chromium is needed for this test (scripts/test.sh installs Debian's `chromium`)");
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin)
        .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("ws://") {
                let _ = tx.send(line[i..].trim().to_string());
            }
        }
    });
    let browser_ws = rx.recv_timeout(Duration::from_secs(30)).expect("chromium printed no DevTools address");
    let browser = Browser { child, _profile: profile };
    let http = browser_ws.replacen("ws://", "http://", 1);
    let base = &http[..http.find("/devtools").unwrap()];
    let targets: Value = client().get(format!("{base}/json/list")).send().unwrap().json().unwrap();
    let page_ws = targets
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == "page")
        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
        .expect("a page target")
        .to_string();
    let (socket, _) = tungstenite::connect(page_ws).expect("devtools websocket");
    (browser, Page { socket, next: 0 })
}

#[test]
fn graphiql_renders_introspects_and_runs_a_query_offline() {
    let s = shared();
    let (_browser, mut page) = launch();
    page.call("Page.enable", json!({}));
    page.call("Page.navigate", json!({"url": format!("{}/graphql", s.url)}));
    page.wait_for("the IDE to render", "!!document.querySelector('.graphiql-container .graphiql-query-editor')");
    // The schema, by introspection: the documentation explorer lists the root query type.
    page.wait_for(
        "the documentation explorer button",
        "(() => { const b = document.querySelector('[aria-label=\"Show Documentation Explorer\"]'); if (b) b.click(); return !!b; })()",
    );
    page.wait_for(
        "the schema to load",
        "(() => { const d = document.querySelector('.graphiql-doc-explorer'); return d && d.innerText.includes('QueryRoot'); })()",
    );
    // A query typed into the editor and run with the execute button.
    page.eval("document.querySelector('.graphiql-query-editor .CodeMirror').CodeMirror.setValue('{ models { id ownedBy } }')");
    page.eval("document.querySelector('.graphiql-execute-button').click()");
    let result = page.wait_for(
        "the query's result",
        "(() => { const r = document.querySelector('.graphiql-response .CodeMirror'); const v = r && r.CodeMirror.getValue(); return v && v.includes('SmolLM2') ? v : ''; })()",
    );
    let v: Value = serde_json::from_str(result.as_str().unwrap()).unwrap();
    let ids: Vec<&str> = v["data"]["models"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert!(ids.contains(&"SmolLM2-135M-Instruct") && ids.contains(&"all-MiniLM-L6-v2"), "{v}");
}
