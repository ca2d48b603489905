//! A tiny HTTP/1.1 client over a raw TCP socket, for the blob URLs, the
//! `@connections` API and refused upgrades: one request per connection,
//! bodies framed by Content-Length, chunked encoding or the connection closing.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An HTTP response as it came off the wire.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name`, whatever its case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("HTTP {} body is not JSON ({e}): {}", self.status, self.text()))
    }
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Sends one request to an `http://host:port/path?query` URL and reads the
/// whole answer. `headers` go out exactly as given; `Host`, `Connection:
/// close` and `Content-Length` are added unless given.
pub async fn request(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> io::Result<Response> {
    let rest = url.strip_prefix("http://").ok_or_else(|| invalid(format!("not an http:// URL: {url}")))?;
    let (authority, target) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
    let given = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));

    let mut head = format!("{method} {target} HTTP/1.1\r\n");
    if !given("host") {
        head.push_str(&format!("Host: {authority}\r\n"));
    }
    if !given("connection") {
        head.push_str("Connection: close\r\n");
    }
    if !given("content-length") && (!body.is_empty() || matches!(method, "POST" | "PUT")) {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");

    let mut stream = TcpStream::connect(authority).await?;
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await?;
    Reader { stream, buf: Vec::new() }.response(method).await
}

pub async fn get(url: &str) -> io::Result<Response> {
    request("GET", url, &[], b"").await
}

pub async fn post(url: &str, body: &[u8]) -> io::Result<Response> {
    request("POST", url, &[], body).await
}

pub async fn put(url: &str, headers: &[(&str, &str)], body: &[u8]) -> io::Result<Response> {
    request("PUT", url, headers, body).await
}

pub async fn delete(url: &str) -> io::Result<Response> {
    request("DELETE", url, &[], b"").await
}

/// The read side: bytes received but not yet consumed wait in `buf`.
struct Reader {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Reader {
    /// Reads more bytes into `buf`; `false` at the end of the stream.
    async fn fill(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// One CRLF-terminated line, without its CRLF.
    async fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).take(i).collect();
                return String::from_utf8(line).map_err(|_| invalid("a header line is not UTF-8"));
            }
            if !self.fill().await? {
                return Err(invalid("the connection closed in the middle of a line"));
            }
        }
    }

    async fn exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await? {
                return Err(invalid(format!("the body ended after {} of {n} bytes", self.buf.len())));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    async fn until_closed(&mut self) -> io::Result<Vec<u8>> {
        while self.fill().await? {}
        Ok(std::mem::take(&mut self.buf))
    }

    async fn response(mut self, method: &str) -> io::Result<Response> {
        let status_line = self.line().await?;
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let line = self.line().await?;
            if line.is_empty() {
                break;
            }
            let (name, value) =
                line.split_once(':').ok_or_else(|| invalid(format!("bad header line {line:?}")))?;
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
        let mut response = Response { status, headers, body: Vec::new() };
        // 101 hands the socket over to another protocol; these carry no body.
        if (100..200).contains(&status) || status == 204 || status == 304 || method == "HEAD" {
            return Ok(response);
        }
        let chunked =
            response.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        response.body = if chunked {
            let mut body = Vec::new();
            loop {
                let size_line = self.line().await?;
                let hex = size_line.split(';').next().unwrap_or_default().trim();
                let size = usize::from_str_radix(hex, 16)
                    .map_err(|_| invalid(format!("bad chunk size {size_line:?}")))?;
                if size == 0 {
                    while !self.line().await?.is_empty() {}
                    break body;
                }
                body.extend(self.exact(size).await?);
                if !self.line().await?.is_empty() {
                    return Err(invalid("a chunk does not end with CRLF"));
                }
            }
        } else if let Some(length) = response.header("content-length") {
            let length = length.parse().map_err(|_| invalid(format!("bad content-length {length:?}")))?;
            self.exact(length).await?
        } else {
            self.until_closed().await?
        };
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves one canned answer and returns the request it read.
    async fn serve_once(answer: &'static [u8]) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = socket.read(&mut buf).await.unwrap();
                request.extend_from_slice(&buf[..n]);
            }
            socket.write_all(answer).await.unwrap();
            socket.shutdown().await.unwrap();
            String::from_utf8(request).unwrap()
        });
        (url, task)
    }

    #[tokio::test]
    async fn reads_bodies_framed_each_way() {
        let (url, _) =
            serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhelloIGNORED").await;
        let r = super::get(&format!("{url}/x")).await.unwrap();
        assert_eq!((r.status, r.body.as_slice(), r.header("x-a")), (200, &b"hello"[..], Some("b")));

        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let (url, _) = serve_once(chunked).await;
        assert_eq!(super::get(&url).await.unwrap().body, b"abcde");

        let (url, _) = serve_once(b"HTTP/1.1 200 OK\r\n\r\nuntil close").await;
        assert_eq!(super::get(&url).await.unwrap().body, b"until close");

        let (url, _) = serve_once(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        assert!(super::delete(&url).await.unwrap().body.is_empty());
    }

    #[tokio::test]
    async fn sends_the_method_target_headers_and_body() {
        let (url, request) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        super::put(&format!("{url}/blobs/1?a=b"), &[("content-type", "text/plain")], b"hi").await.unwrap();
        let request = request.await.unwrap();
        assert!(request.starts_with("PUT /blobs/1?a=b HTTP/1.1\r\n"), "{request}");
        assert!(request.contains("\r\nContent-Length: 2\r\n"), "{request}");
        assert!(request.contains("\r\ncontent-type: text/plain\r\n"), "{request}");
        assert!(request.contains("\r\nConnection: close\r\n"), "{request}");
    }
}
