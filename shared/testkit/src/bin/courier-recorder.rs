//! The AWS endpoint of the Lambda processes in scripts/lambda-invoke-check:
//! logs each request, named by [`courier_testkit::meter::request_name`] as
//! the in-process meter names it, then forwards it to moto (or, for the
//! @connections API, which moto lacks, answers it itself).
//!
//!     courier-recorder PORT UPSTREAM_HOST:PORT LOG
//!
//! LOG gets one JSON line a request, written before it is answered:
//! `{"request": "DynamoDB.PutItem", "method": "POST", "path": "/", "body": "{...}"}`.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use courier_testkit::meter::request_name;

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// The next request on a connection; `None` once the client has closed it.
fn read_request(reader: &mut impl BufRead) -> anyhow::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else { bail!("bad request line {line:?}") };
    let mut request =
        Request { method: method.to_owned(), path: path.to_owned(), headers: Vec::new(), body: Vec::new() };
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').with_context(|| format!("bad header {line:?}"))?;
        request.headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    // The SDK and urllib send sized bodies; a chunked one would be forwarded wrong.
    if request.header("transfer-encoding").is_some() {
        bail!("{} {}: chunked request bodies are not supported", request.method, request.path);
    }
    let length: usize = request.header("content-length").unwrap_or("0").parse().context("content-length")?;
    request.body = vec![0; length];
    reader.read_exact(&mut request.body)?;
    Ok(Some(request))
}

/// Sends `request` to moto and returns its answer, framed for the client.
/// Moto is asked in HTTP/1.0, so that its answer is never chunked and ends
/// where its connection does.
fn forward(upstream: &str, request: &Request) -> anyhow::Result<Vec<u8>> {
    let mut moto = TcpStream::connect(upstream).with_context(|| format!("connecting to {upstream}"))?;
    let mut out = format!("{} {} HTTP/1.0\r\n", request.method, request.path);
    for (name, value) in request.headers.iter().filter(|(n, _)| !n.eq_ignore_ascii_case("connection")) {
        out += &format!("{name}: {value}\r\n");
    }
    out += "\r\n";
    moto.write_all(out.as_bytes())?;
    moto.write_all(&request.body)?;
    let mut answer = Vec::new();
    moto.read_to_end(&mut answer)?;

    let end = answer.windows(4).position(|w| w == b"\r\n\r\n").context("an answer without a head")?;
    let head = String::from_utf8_lossy(&answer[..end]);
    let body = &answer[end + 4..];
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_once(' ')).map(|(_, s)| s).context("no status line")?;
    let mut out = format!("HTTP/1.1 {status}\r\n");
    let mut declared = "0";
    for line in lines {
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        let name = name.trim().to_ascii_lowercase();
        match name.as_str() {
            "content-length" => declared = value.trim(),
            "connection" | "keep-alive" | "transfer-encoding" => {}
            _ => out += &format!("{line}\r\n"),
        }
    }
    // A HEAD answer declares the length of the body it leaves out.
    let length = if request.method == "HEAD" { declared.to_owned() } else { body.len().to_string() };
    out += &format!("content-length: {length}\r\n\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    Ok(out)
}

/// The @connections API of the stage, as far as the functions use it.
fn connections(method: &str) -> Vec<u8> {
    let status = match method {
        "POST" => "200 OK",
        "DELETE" => "204 No Content",
        _ => "404 Not Found",
    };
    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").into_bytes()
}

fn serve(client: TcpStream, upstream: &str, log: &Mutex<File>) -> anyhow::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client = client;
    while let Some(request) = read_request(&mut reader)? {
        let name = request_name(&request.method, &request.path, request.header("x-amz-target"));
        let line = serde_json::json!({
            "request": name,
            "method": request.method,
            "path": request.path,
            "body": String::from_utf8_lossy(&request.body),
        });
        writeln!(log.lock().unwrap_or_else(|e| e.into_inner()), "{line}")?;
        let answer = if name.starts_with("ApiGatewayManagementApi.") {
            connections(&request.method)
        } else {
            forward(upstream, &request)?
        };
        client.write_all(&answer)?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [port, upstream, log] = args.as_slice() else {
        bail!("usage: courier-recorder PORT UPSTREAM_HOST:PORT LOG");
    };
    let listener = TcpListener::bind(("127.0.0.1", port.parse::<u16>().context("PORT")?))?;
    let log = Arc::new(Mutex::new(File::create(log).with_context(|| format!("creating {log}"))?));
    for client in listener.incoming() {
        let (client, upstream, log) = (client?, upstream.clone(), log.clone());
        std::thread::spawn(move || {
            if let Err(e) = serve(client, &upstream, &log) {
                eprintln!("courier-recorder: {e:#}");
            }
        });
    }
    Ok(())
}
