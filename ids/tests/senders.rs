//! The real code senders against real counterparts on loopback: an SMTP
//! server (aiosmtpd from PyPI) and an HTTP endpoint standing in for an SMS
//! provider's webhook.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ids::core::verification::Code;
use ids::sender::{CodeSender, SmtpSender, WebhookSender};
use wire::Handle;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_sender_delivers_the_code_to_a_real_smtp_server() {
    parley_tests::tool::require("python3");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new("python3")
        .args([
            "-u",
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("start aiosmtpd (scripts/install-deps.sh installs it)");
    // Wait (bounded) until it accepts connections.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = server.try_wait().unwrap() {
            let mut err = String::new();
            server
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("aiosmtpd exited ({status}): {err} — run scripts/install-deps.sh");
        }
        assert!(
            Instant::now() < deadline,
            "aiosmtpd did not listen within 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let sender = SmtpSender::new(
        &format!("smtp://127.0.0.1:{port}"),
        "Parley <no-reply@parley.test>",
    )
    .unwrap();
    let to = Handle::parse("Alice@Example.com").unwrap();
    sender.send(&to, &Code("424242".into())).await.unwrap();
    // aiosmtpd's default handler prints each message to stdout.
    let stdout = server.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
            if line.contains("END MESSAGE") {
                let _ = tx.send(text.clone());
            }
        }
    });
    let text = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("aiosmtpd printed the message");
    let _ = server.kill();
    let _ = server.wait();
    assert!(text.contains("alice@example.com"), "{text}");
    assert!(text.contains("no-reply@parley.test"), "{text}");
    assert!(text.contains("Subject: Your Parley code"), "{text}");
    assert!(text.contains("424242"), "{text}");
    // A phone number cannot go by email.
    let phone = Handle::parse("+14155550123").unwrap();
    assert!(sender.send(&phone, &Code("1".into())).await.is_err());
}

#[test]
fn smtp_in_clear_is_refused_beyond_loopback() {
    let err = SmtpSender::new("smtp://mail.example.com:25", "a@example.com").unwrap_err();
    assert!(err.to_string().contains("clear"), "{err}");
    SmtpSender::new("smtps://u:p@mail.example.com:465", "a@example.com").unwrap();
    SmtpSender::new("smtp://mail.example.com:587?tls=required", "a@example.com").unwrap();
    assert!(WebhookSender::new("http://sms.example.com/send", None).is_err());
    WebhookSender::new("https://sms.example.com/send", None).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_sender_posts_json_with_the_bearer_token() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/sms?x=1", listener.local_addr().unwrap());
    // One request with 204, then one with 500.
    let server = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for status in ["204 No Content", "500 Internal Server Error"] {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut head = String::new();
            let mut len = 0;
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            write!(s, "HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").unwrap();
            seen.push((head, String::from_utf8(body).unwrap()));
        }
        seen
    });
    let sender = WebhookSender::new(&url, Some("s3cret".into())).unwrap();
    assert!(
        !format!("{sender:?}").contains("s3cret"),
        "the token never shows in Debug"
    );
    let to = Handle::parse("+1 415 555 0123").unwrap();
    sender.send(&to, &Code("135790".into())).await.unwrap();
    let err = sender.send(&to, &Code("135790".into())).await.unwrap_err();
    assert!(matches!(err, ids::Error::Unavailable(_)), "{err:?}");
    let seen = server.join().unwrap();
    let (head, body) = &seen[0];
    assert!(head.starts_with("POST /sms?x=1 HTTP/1.1\r\n"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("authorization: bearer s3cret"),
        "{head}"
    );
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["to"], "+14155550123");
    assert_eq!(v["kind"], "phone");
    assert!(v["text"].as_str().unwrap().contains("135790"));
}
