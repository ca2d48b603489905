//! AWS Signature Version 4 checks, so only holders of the configured key can use the management API.
//!
//! Header auth only (`Authorization: AWS4-HMAC-SHA256 ...`), as the SDKs
//! send it: a presigned query-string URL is refused. The canonical URI gets
//! no dot-segment normalization: no connection id needs it, and a request
//! that would just fails to verify.

use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderMap, Method, Uri};
use sha2::{Digest, Sha256};

const ALGORITHM: &str = "AWS4-HMAC-SHA256";
const SERVICE: &str = "execute-api";
/// How far `X-Amz-Date` may be from this server's clock, either way (API Gateway's window).
const MAX_SKEW_SECS: i64 = 15 * 60;

/// Why a request was refused. For the server's log only: the client always hears "Forbidden".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused(pub &'static str);

/// The access key management requests must be signed with.
pub struct Verifier {
    key_id: String,
    secret: String,
}

/// The parts of an `Authorization` header.
struct Authorization<'a> {
    key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: &'a str,
    signature: &'a str,
}

impl Verifier {
    pub fn new(key_id: impl Into<String>, secret: impl Into<String>) -> Self {
        Self { key_id: key_id.into(), secret: secret.into() }
    }

    /// Checks that the request was signed by this key, for `execute-api` in
    /// any region, within 15 minutes of `now`, over exactly this body.
    pub fn verify(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Result<(), Refused> {
        let auth = parse_authorization(
            single(headers, "authorization")?.ok_or(Refused("no Authorization header"))?,
        )?;
        if auth.key_id != self.key_id {
            return Err(Refused("not the configured access key"));
        }
        if auth.service != SERVICE {
            return Err(Refused("not signed for execute-api"));
        }
        let signed: Vec<&str> = auth.signed_headers.split(';').collect();
        if !signed.contains(&"host") || !signed.contains(&"x-amz-date") {
            return Err(Refused("host and x-amz-date must be signed"));
        }
        let amz_date = single(headers, "x-amz-date")?.ok_or(Refused("no X-Amz-Date header"))?;
        let signed_at = parse_amz_date(amz_date).ok_or(Refused("malformed X-Amz-Date"))?;
        if !amz_date.starts_with(auth.date) {
            return Err(Refused("credential date is not X-Amz-Date's"));
        }
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        if (now - signed_at).abs() > MAX_SKEW_SECS {
            return Err(Refused("X-Amz-Date is more than 15 minutes off"));
        }
        // The body is hashed here, never taken on the client's word: a
        // declared hash must be the body's own.
        let payload_hash = hex::encode(Sha256::digest(body).as_slice());
        if let Some(declared) = single(headers, "x-amz-content-sha256")?
            && declared != payload_hash
        {
            return Err(Refused("x-amz-content-sha256 is not the body's hash"));
        }
        let canonical = canonical_request(method, uri, headers, auth.signed_headers, &payload_hash)?;
        check_signature(&self.secret, &auth, amz_date, &canonical)
    }
}

/// The value of a header that may appear at most once.
fn single<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, Refused> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(Refused("a header that must appear once appears twice"));
    }
    value.to_str().map(Some).map_err(|_| Refused("a header is not text"))
}

/// `AWS4-HMAC-SHA256 Credential=KEY/DATE/REGION/SERVICE/aws4_request, SignedHeaders=a;b, Signature=HEX`.
fn parse_authorization(value: &str) -> Result<Authorization<'_>, Refused> {
    let malformed = Refused("malformed Authorization header");
    let rest = value.strip_prefix(ALGORITHM).and_then(|r| r.strip_prefix(' ')).ok_or(malformed)?;
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (name, value) = part.trim().split_once('=').ok_or(malformed)?;
        let slot = match name {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed_headers,
            "Signature" => &mut signature,
            _ => return Err(malformed),
        };
        if slot.replace(value).is_some() {
            return Err(malformed);
        }
    }
    let (Some(credential), Some(signed_headers), Some(signature)) = (credential, signed_headers, signature)
    else {
        return Err(malformed);
    };
    let scope: Vec<&str> = credential.split('/').collect();
    let [key_id, date, region, service, "aws4_request"] = scope[..] else {
        return Err(malformed);
    };
    if date.len() != 8 || region.is_empty() || signed_headers.is_empty() {
        return Err(malformed);
    }
    Ok(Authorization { key_id, date, region, service, signed_headers, signature })
}

/// The canonical request of SigV4 for services other than S3: the path
/// encoded once more as it came (so `%3D` on the wire is `%253D` here, as
/// the SDKs sign it), the query re-encoded and sorted, the signed headers
/// trimmed, and the payload's hash.
fn canonical_request(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    signed_headers: &str,
    payload_hash: &str,
) -> Result<String, Refused> {
    let path = if uri.path().is_empty() { "/" } else { uri.path() };
    let mut out =
        format!("{method}\n{}\n{}\n", uri_encode(path, true), canonical_query(uri.query().unwrap_or("")));
    for name in signed_headers.split(';') {
        let mut values = Vec::new();
        for value in headers.get_all(name) {
            values.push(trim_all(value.to_str().map_err(|_| Refused("a signed header is not text"))?));
        }
        // An HTTP/2 request carries its host as the authority, not a header.
        if values.is_empty() && name == "host" {
            values.extend(uri.authority().map(|a| a.as_str().to_owned()));
        }
        if values.is_empty() || name.is_empty() || name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(Refused("a signed header is missing"));
        }
        out.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    out.push_str(&format!("\n{signed_headers}\n{payload_hash}"));
    Ok(out)
}

/// Compares the request's signature with the one its credential scope's key gives, in constant time.
fn check_signature(
    secret: &str,
    auth: &Authorization<'_>,
    amz_date: &str,
    canonical: &str,
) -> Result<(), Refused> {
    let given = hex::decode(auth.signature).map_err(|_| Refused("malformed signature"))?;
    let to_sign = format!(
        "{ALGORITHM}\n{amz_date}\n{}/{}/{}/aws4_request\n{}",
        auth.date,
        auth.region,
        auth.service,
        hex::encode(Sha256::digest(canonical.as_bytes()).as_slice())
    );
    let key = signing_key(secret, auth.date, auth.region, auth.service);
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(to_sign.as_bytes());
    mac.verify_slice(&given).map_err(|_| Refused("signature does not match"))
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// The key for one day, region and service, derived from the secret.
fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> Vec<u8> {
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), date);
    let k_region = hmac(&k_date, region);
    let k_service = hmac(&k_region, service);
    hmac(&k_service, "aws4_request")
}

/// Percent-encodes every byte but the unreserved ones (and `/` in a path), in uppercase hex.
fn uri_encode(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Each name and value decoded as a form does (as the Rust SDK reads its own
/// query), encoded again, and the pairs sorted.
fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (uri_encode(&form_decode(name), false), uri_encode(&form_decode(value), false))
        })
        .collect();
    pairs.sort();
    pairs.iter().map(|(name, value)| format!("{name}={value}")).collect::<Vec<_>>().join("&")
}

fn form_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = || {
            std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok().and_then(|h| u8::from_str_radix(h, 16).ok())
        };
        match (bytes[i], hex()) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Leading and trailing spaces dropped, inner runs of spaces made one.
fn trim_all(value: &str) -> String {
    value.split(' ').filter(|word| !word.is_empty()).collect::<Vec<_>>().join(" ")
}

/// `20150830T123600Z` as seconds since the epoch.
fn parse_amz_date(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let shape_ok = b.len() == 16
        && b[8] == b'T'
        && b[15] == b'Z'
        && b.iter().enumerate().all(|(i, c)| i == 8 || i == 15 || c.is_ascii_digit());
    if !shape_ok {
        return None;
    }
    let n = |from: usize, to: usize| text[from..to].parse::<i64>().ok();
    let (year, month, day) = (n(0, 4)?, n(4, 6)?, n(6, 8)?);
    let (hour, minute, second) = (n(9, 11)?, n(11, 13)?, n(13, 15)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The secret of AWS's SigV4 test suite (docs.aws.amazon.com/general/latest/gr/signature-v4-test-suite.html).
    const SUITE_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const EMPTY_HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn request(method: &str, target: &str, headers: &[(&str, &str)]) -> (Method, Uri, HeaderMap) {
        let mut builder = http::Request::builder().method(method).uri(target);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let (parts, ()) = builder.body(()).unwrap().into_parts();
        (parts.method, parts.uri, parts.headers)
    }

    /// Checks a request of the test suite, whose service is `service`, not execute-api.
    fn suite_check(method: &str, target: &str, authorization: &str, canonical: &str) {
        let (method, uri, mut headers) =
            request(method, target, &[("Host", "example.amazonaws.com"), ("X-Amz-Date", "20150830T123600Z")]);
        headers.insert("authorization", authorization.parse().unwrap());
        let auth = parse_authorization(authorization).unwrap();
        let ours = canonical_request(&method, &uri, &headers, auth.signed_headers, EMPTY_HASH).unwrap();
        assert_eq!(ours, canonical);
        check_signature(SUITE_SECRET, &auth, "20150830T123600Z", &ours)
            .expect("the suite's signature verifies");
        let wrong = check_signature("another secret", &auth, "20150830T123600Z", &ours);
        assert_eq!(wrong, Err(Refused("signature does not match")));
    }

    #[test]
    fn the_suites_get_vanilla_verifies() {
        suite_check(
            "GET",
            "/",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        );
    }

    #[test]
    fn the_suites_post_vanilla_and_encoded_query_verify() {
        suite_check(
            "POST",
            "/",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
            "POST\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        );
        suite_check(
            "GET",
            "/?Param-3=Value3&Param=Value2&%E1%88%B4=Value1",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=371d3713e185cc334048618a97f809c9ffe339c62934c032af5a0e595648fcac",
            "GET\n/\n%E1%88%B4=Value1&Param=Value2&Param-3=Value3\nhost:example.amazonaws.com\n\
             x-amz-date:20150830T123600Z\n\nhost;x-amz-date\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        );
    }

    #[test]
    fn an_encoded_connection_id_is_encoded_again() {
        // The suite's double-encode-path case, the management API's own shape.
        let (method, uri, headers) = request(
            "POST",
            "/test/@connections/JBDvjfGEIAMCERw%3D",
            &[("Host", "tj9n5r0m12.execute-api.us-east-1.amazonaws.com"), ("X-Amz-Date", "20210511T154045Z")],
        );
        let canonical = canonical_request(&method, &uri, &headers, "host;x-amz-date", EMPTY_HASH).unwrap();
        assert_eq!(
            canonical,
            "POST\n/test/%40connections/JBDvjfGEIAMCERw%253D\n\n\
             host:tj9n5r0m12.execute-api.us-east-1.amazonaws.com\nx-amz-date:20210511T154045Z\n\n\
             host;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn header_values_are_trimmed_and_joined() {
        let (method, uri, mut headers) =
            request("GET", "/", &[("Host", "h"), ("My-Header2", "  \"a   b   c\" ")]);
        headers.append("my-header1", "one".parse().unwrap());
        headers.append("my-header1", "two".parse().unwrap());
        let canonical =
            canonical_request(&method, &uri, &headers, "host;my-header1;my-header2", "x").unwrap();
        assert_eq!(
            canonical,
            "GET\n/\n\nhost:h\nmy-header1:one,two\nmy-header2:\"a b c\"\n\nhost;my-header1;my-header2\nx"
        );
        let missing = canonical_request(&method, &uri, &headers, "host;x-amz-date", "x");
        assert_eq!(missing, Err(Refused("a signed header is missing")));
    }

    #[test]
    fn amz_dates_are_read_as_utc() {
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(0));
        assert_eq!(parse_amz_date("20150830T123600Z"), Some(1_440_938_160));
        assert_eq!(parse_amz_date("20240229T235959Z"), Some(1_709_251_199));
        for bad in ["20150830T123600", "2015-08-30T12:36:00Z", "20151330T123600Z", "20150830T253600Z", ""] {
            assert_eq!(parse_amz_date(bad), None, "{bad}");
        }
    }

    const AT: &str = "20240229T120000Z";
    fn at() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(parse_amz_date(AT).unwrap() as u64)
    }

    /// Signs a management request with the suite-checked pieces above.
    fn signed(
        key_id: &str,
        secret: &str,
        amz_date: &str,
        service: &str,
        body: &[u8],
    ) -> (Method, Uri, HeaderMap) {
        let (method, uri, mut headers) = request(
            "POST",
            "/@connections/AbC-_x%3D",
            &[("Host", "127.0.0.1:3001"), ("X-Amz-Date", amz_date), ("Content-Type", "application/json")],
        );
        let signed_headers = "content-type;host;x-amz-date";
        let hash = hex::encode(Sha256::digest(body).as_slice());
        let canonical = canonical_request(&method, &uri, &headers, signed_headers, &hash).unwrap();
        let scope = format!("{}/eu-west-3/{service}/aws4_request", &amz_date[..8]);
        let to_sign = format!(
            "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
            hex::encode(Sha256::digest(canonical.as_bytes()).as_slice())
        );
        let signature =
            hex::encode(hmac(&signing_key(secret, &amz_date[..8], "eu-west-3", service), &to_sign));
        let value = format!(
            "{ALGORITHM} Credential={key_id}/{scope}, SignedHeaders={signed_headers}, Signature={signature}"
        );
        headers.insert("authorization", value.parse().unwrap());
        (method, uri, headers)
    }

    fn verify(request: &(Method, Uri, HeaderMap), body: &[u8], now: SystemTime) -> Result<(), Refused> {
        Verifier::new("test", "test").verify(&request.0, &request.1, &request.2, body, now)
    }

    #[test]
    fn a_request_signed_with_the_key_in_any_region_passes() {
        let request = signed("test", "test", AT, "execute-api", b"{}");
        assert_eq!(verify(&request, b"{}", at()), Ok(()));
        assert_eq!(verify(&request, b"{}", at() + Duration::from_secs(15 * 60)), Ok(()));
        assert_eq!(verify(&request, b"{}", at() - Duration::from_secs(15 * 60)), Ok(()));
    }

    #[test]
    fn anything_else_is_refused() {
        let late = Refused("X-Amz-Date is more than 15 minutes off");
        let good = signed("test", "test", AT, "execute-api", b"{}");
        assert_eq!(verify(&good, b"{}", at() + Duration::from_secs(15 * 60 + 1)), Err(late));
        assert_eq!(verify(&good, b"{}", at() - Duration::from_secs(15 * 60 + 1)), Err(late));
        assert_eq!(verify(&good, b"{ }", at()), Err(Refused("signature does not match")));

        let cases = [
            (signed("test", "wrong", AT, "execute-api", b"{}"), "signature does not match"),
            (signed("other", "test", AT, "execute-api", b"{}"), "not the configured access key"),
            (signed("test", "test", AT, "s3", b"{}"), "not signed for execute-api"),
        ];
        for (request, why) in cases {
            assert_eq!(verify(&request, b"{}", at()), Err(Refused(why)));
        }

        let mut no_auth = good.clone();
        no_auth.2.remove("authorization");
        assert_eq!(verify(&no_auth, b"{}", at()), Err(Refused("no Authorization header")));

        let mut wrong_hash = good.clone();
        wrong_hash.2.insert("x-amz-content-sha256", EMPTY_HASH.parse().unwrap());
        assert_eq!(
            verify(&wrong_hash, b"{}", at()),
            Err(Refused("x-amz-content-sha256 is not the body's hash"))
        );

        let mut other_date = good.clone();
        other_date.2.insert("x-amz-date", "20240229T120001Z".parse().unwrap());
        assert_eq!(verify(&other_date, b"{}", at()), Err(Refused("signature does not match")));

        let mut host_unsigned = good.clone();
        let auth = host_unsigned.2["authorization"]
            .to_str()
            .unwrap()
            .replace("content-type;host;x-amz-date", "content-type;x-amz-date");
        host_unsigned.2.insert("authorization", auth.parse().unwrap());
        assert_eq!(verify(&host_unsigned, b"{}", at()), Err(Refused("host and x-amz-date must be signed")));

        for garbage in [
            "Bearer x",
            "AWS4-HMAC-SHA256 Credential=test/20240229/r/execute-api/aws4_request",
            "AWS4-HMAC-SHA256",
        ] {
            let mut request = good.clone();
            request.2.insert("authorization", garbage.parse().unwrap());
            assert_eq!(
                verify(&request, b"{}", at()),
                Err(Refused("malformed Authorization header")),
                "{garbage}"
            );
        }
    }
}
