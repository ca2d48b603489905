//! The checks `registerPush` makes on a Web Push subscription, and which addresses count as public.
//!
//! A subscription's endpoint is a URL the client chooses and the server then
//! POSTs to, so unchecked it would let any user make the server send
//! requests into its own network. Deployed, an endpoint must be https and
//! its host a public address; the senders check again on every request
//! (a name can resolve differently later).
//!
//! The errors are messages for a `BAD_REQUEST`: they name the field and
//! what was expected, never the value.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use base64::Engine;
use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use reqwest::Url;

/// The longest endpoint accepted: the bound the protocol sets on FCM and
/// APNs tokens. Real ones are a few hundred characters.
pub const MAX_ENDPOINT: usize = 4096;

/// How long resolving an endpoint's host may take at registration.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// base64url, with or without padding: browsers leave it off
/// (`PushSubscription.toJSON()`), some server libraries put it on.
const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

pub(crate) fn decode_base64url(text: &str) -> Option<Vec<u8>> {
    BASE64URL.decode(text).ok()
}

/// A subscription's keys, decoded and checked: the user agent's P-256
/// public key and its 16-byte authentication secret (RFC 8291 §2).
pub(crate) fn decode_keys(p256dh: &str, auth: &str) -> Result<(p256::PublicKey, [u8; 16]), &'static str> {
    let point = decode_base64url(p256dh).ok_or("subscription keys.p256dh: expected base64url")?;
    // from_sec1_bytes also takes compressed points; RFC 8291 sends the uncompressed one.
    if point.len() != 65 || point[0] != 0x04 {
        return Err("subscription keys.p256dh: expected an uncompressed P-256 public key (65 bytes)");
    }
    let public = p256::PublicKey::from_sec1_bytes(&point)
        .map_err(|_| "subscription keys.p256dh: not a point on the P-256 curve")?;
    let auth = decode_base64url(auth).ok_or("subscription keys.auth: expected base64url")?;
    let auth: [u8; 16] = auth.try_into().map_err(|_| "subscription keys.auth: expected 16 bytes")?;
    Ok((public, auth))
}

/// Checks a Web Push subscription as `registerPush` receives it. The
/// endpoint must be an https URL (or, when `allow_loopback_http`, as for
/// courier-local's tests, an `http://127.0.0.1:PORT/...` one); `p256dh` must
/// be the base64url of an uncompressed P-256 point on the curve, and `auth`
/// of 16 bytes. Deployed, also call [`check_public_endpoint`].
pub fn check_subscription(
    endpoint: &str,
    p256dh: &str,
    auth: &str,
    allow_loopback_http: bool,
) -> Result<(), &'static str> {
    check_endpoint(endpoint, allow_loopback_http)?;
    decode_keys(p256dh, auth).map(|_| ())
}

fn check_endpoint(endpoint: &str, allow_loopback_http: bool) -> Result<(), &'static str> {
    if endpoint.len() > MAX_ENDPOINT {
        return Err("subscription endpoint: at most 4096 characters");
    }
    let url = Url::parse(endpoint).map_err(|_| "subscription endpoint: expected an https URL")?;
    // Credentials in the URL would be sent along as Basic authorization.
    if !url.username().is_empty() || url.password().is_some() {
        return Err("subscription endpoint: expected no user name or password");
    }
    match (url.scheme(), url.host_str()) {
        ("https", Some(_)) => Ok(()),
        ("http", Some(_))
            if allow_loopback_http && host_ip(&url) == Some(IpAddr::V4(Ipv4Addr::LOCALHOST)) =>
        {
            Ok(())
        }
        _ if allow_loopback_http => {
            Err("subscription endpoint: expected an https URL or http://127.0.0.1:PORT/")
        }
        _ => Err("subscription endpoint: expected an https URL"),
    }
}

/// The URL's host as an address, if it is one (IPv6 without its brackets).
pub(crate) fn host_ip(url: &Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host).parse().ok()
}

/// Refuses an endpoint whose host is, or resolves to, an address that is
/// not public (see [`is_public`]): the deployed rule for `registerPush`.
pub async fn check_public_endpoint(endpoint: &str) -> Result<(), &'static str> {
    let url = Url::parse(endpoint).map_err(|_| "subscription endpoint: expected an https URL")?;
    let host = url.host_str().ok_or("subscription endpoint: expected an https URL")?;
    check_public_host(host).await
}

/// Refuses a host that is, or resolves to, an address that is not public.
/// A name must resolve, and every address it resolves to must be public:
/// one private address among public ones is refused too.
pub async fn check_public_host(host: &str) -> Result<(), &'static str> {
    const NOT_PUBLIC: &str = "subscription endpoint: the host must be a public address";
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return if is_public(ip) { Ok(()) } else { Err(NOT_PUBLIC) };
    }
    // RFC 6761: such names are loopback whatever a resolver says.
    let name = bare.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return Err(NOT_PUBLIC);
    }
    let resolved = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((bare, 443))).await;
    let addresses: Vec<IpAddr> = match resolved {
        Ok(Ok(found)) => found.map(|a| a.ip()).collect(),
        _ => return Err("subscription endpoint: the host does not resolve"),
    };
    if addresses.is_empty() {
        return Err("subscription endpoint: the host does not resolve");
    }
    if addresses.into_iter().all(is_public) { Ok(()) } else { Err(NOT_PUBLIC) }
}

/// Whether `ip` is a public unicast address: not unspecified, loopback,
/// private (RFC 1918, fc00::/7), link-local, shared (CGNAT, 100.64/10),
/// multicast, broadcast, documentation, benchmarking or reserved, and
/// (for IPv6 forms that carry an IPv4 address) not carrying such an address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0                                    // "this network", 0.0.0.0/8
        || a == 10                              // RFC 1918
        || a == 127                             // loopback
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT), RFC 6598
        || (a == 169 && b == 254)               // link-local
        || (a == 172 && (16..32).contains(&b))  // RFC 1918
        || (a == 192 && b == 0 && c == 0)       // IETF protocol assignments, RFC 6890
        || (a == 192 && b == 0 && c == 2)       // TEST-NET-1
        || (a == 192 && b == 88 && c == 99)     // 6to4 relay anycast, deprecated
        || (a == 192 && b == 168)               // RFC 1918
        || (a == 198 && (18..20).contains(&b))  // benchmarking, RFC 2544
        || (a == 198 && b == 51 && c == 100)    // TEST-NET-2
        || (a == 203 && b == 0 && c == 113)     // TEST-NET-3
        || a >= 224) // multicast, reserved 240/4 and broadcast
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    // Forms that carry an IPv4 address are as public as that address.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        // NAT64, RFC 6052: 64:ff9b::/96
        return is_public_v4(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8));
    }
    if s[0] == 0x2002 {
        // 6to4, RFC 3056: 2002:V4ADDR::/48
        return is_public_v4(Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8));
    }
    !(ip.is_unspecified()
        || ip.is_loopback()
        || s[0..6] == [0, 0, 0, 0, 0, 0]         // IPv4-compatible ::/96, deprecated
        || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // NAT64 local use, 64:ff9b:1::/48
        || (s[0] == 0x100 && s[1..4] == [0, 0, 0]) // discard-only, 100::/64
        || (s[0] == 0x2001 && s[1] == 0)          // Teredo, 2001::/32: it hides the IPv4 address
        || (s[0] == 0x2001 && s[1] == 0xdb8)      // documentation
        || (s[0] & 0xfe00) == 0xfc00              // unique local, fc00::/7
        || (s[0] & 0xffc0) == 0xfe80              // link-local, fe80::/10
        || (s[0] & 0xffc0) == 0xfec0              // site-local, deprecated
        || (s[0] & 0xff00) == 0xff00) // multicast
}

/// Valid subscription keys, for the crate's unit tests.
#[cfg(test)]
pub(crate) fn test_keys() -> courier_core::ports::WebPushKeys {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    let secret = p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
    let point = secret.public_key().to_encoded_point(false);
    courier_core::ports::WebPushKeys {
        p256dh: URL_SAFE_NO_PAD.encode(point.as_bytes()),
        auth: URL_SAFE_NO_PAD.encode([9u8; 16]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use p256::elliptic_curve::sec1::ToEncodedPoint;

    fn keys() -> (String, String) {
        let keys = test_keys();
        (keys.p256dh, keys.auth)
    }

    #[test]
    fn a_browser_subscription_passes() {
        let (p256dh, auth) = keys();
        let endpoint = "https://fcm.googleapis.com/fcm/send/abc:def";
        assert_eq!(check_subscription(endpoint, &p256dh, &auth, false), Ok(()));
        // Padded base64url, as some libraries write it.
        assert_eq!(check_subscription(endpoint, &format!("{p256dh}="), &format!("{auth}=="), false), Ok(()));
    }

    #[test]
    fn endpoints_must_be_https_or_loopback_http_when_allowed() {
        let (p256dh, auth) = keys();
        let check = |endpoint: &str, allow| check_subscription(endpoint, &p256dh, &auth, allow);
        assert!(check("http://127.0.0.1:8080/push/a", true).is_ok());
        assert!(check("http://127.0.0.1:8080/push/a", false).is_err());
        for refused in [
            "http://localhost:8080/push/a",
            "http://127.0.0.2:8080/push/a",
            "http://[::1]:8080/push/a",
            "http://10.0.0.1/push/a",
            "http://example.com/push",
            "ftp://example.com/push",
            "https://user:secret@example.com/push",
            "https://",
            "not a url",
            "",
        ] {
            assert!(check(refused, true).is_err(), "{refused}");
            assert!(check(refused, false).is_err(), "{refused}");
        }
        let long = format!("https://push.example/{}", "a".repeat(MAX_ENDPOINT));
        assert_eq!(check(&long, false), Err("subscription endpoint: at most 4096 characters"));
    }

    #[test]
    fn keys_must_be_a_p256_point_and_16_bytes() {
        let (p256dh, auth) = keys();
        let endpoint = "https://push.example/a";
        let check = |p: &str, a: &str| check_subscription(endpoint, p, a, false);
        let point = decode_base64url(&p256dh).unwrap();

        assert!(check("%%%", &auth).is_err());
        assert!(check(&URL_SAFE_NO_PAD.encode(&point[..64]), &auth).is_err());
        // The same point compressed: valid SEC1, not what RFC 8291 sends.
        let secret = p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
        let compressed = secret.public_key().to_encoded_point(true);
        assert!(check(&URL_SAFE_NO_PAD.encode(compressed.as_bytes()), &auth).is_err());
        // 65 bytes that start right but lie off the curve.
        let mut off = point.clone();
        off[64] ^= 1;
        assert_eq!(
            check(&URL_SAFE_NO_PAD.encode(&off), &auth),
            Err("subscription keys.p256dh: not a point on the P-256 curve")
        );

        assert!(check(&p256dh, &URL_SAFE_NO_PAD.encode([1u8; 15])).is_err());
        assert!(check(&p256dh, &URL_SAFE_NO_PAD.encode([1u8; 17])).is_err());
        assert!(check(&p256dh, "a+b/").is_err(), "standard base64 is not base64url");
    }

    #[test]
    fn errors_never_quote_the_value() {
        let (_, auth) = keys();
        let e = check_subscription("https://push.example/a", "SECRETVALUE", &auth, false).unwrap_err();
        assert!(!e.contains("SECRETVALUE"));
    }

    #[test]
    fn which_addresses_are_public() {
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "192.169.0.1",
            "2607:f8b0:4004:800::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
        for private in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.255.254",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "198.18.0.1",
            "198.51.100.1",
            "203.0.113.1",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "2001:0:4136:e378::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
            "2002:a00:1::1",
            "100::1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
    }

    #[tokio::test]
    async fn hosts_that_are_or_resolve_to_private_addresses_are_refused() {
        for refused in [
            "127.0.0.1",
            "[::1]",
            "::1",
            "10.0.0.1",
            "[fd00::1]",
            "169.254.169.254",
            "localhost",
            "a.localhost.",
        ] {
            assert!(check_public_host(refused).await.is_err(), "{refused}");
        }
        assert_eq!(check_public_host("8.8.8.8").await, Ok(()));
        assert_eq!(check_public_host("[2607:f8b0:4004:800::200e]").await, Ok(()));
        // .invalid never resolves (RFC 6761).
        assert_eq!(
            check_public_host("push.invalid").await,
            Err("subscription endpoint: the host does not resolve")
        );
        assert!(check_public_endpoint("https://10.0.0.1/push").await.is_err());
        assert!(check_public_endpoint("https://8.8.8.8/push").await.is_ok());
    }
}
