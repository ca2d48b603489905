//! `SnsWakeups` on moto: one platform endpoint per token, content-free publishes, disabled endpoints forgotten, the VAPID key read from SSM once.

use std::sync::{Arc, Mutex};

use aws_sdk_sns::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_sns::config::{ConfigBag, Intercept, RuntimeComponents, SharedInterceptor};
use aws_sdk_sns::error::BoxError;
use aws_sdk_ssm::types::ParameterType;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use courier_aws::{APNS_WAKE_LOC_KEY, SnsWakeups, WakeSettings};
use courier_core::ids::{DeviceId, UserId};
use courier_core::ports::{Platform, PushRegistration, Wakeups, WebPushKeys, Woken};
use courier_testkit::moto::{self, MotoServer};
use courier_wake::VapidKey;
use serde_json::Value;

/// A request's operation and its parameters (the form fields of SNS's query
/// protocol; SSM's JSON body as one field).
type Request = (String, Vec<(String, String)>);

/// Every request the clients send.
#[derive(Clone, Debug, Default)]
struct Requests(Arc<Mutex<Vec<Request>>>);

impl Requests {
    /// How many requests of `operation` were sent.
    fn count(&self, operation: &str) -> usize {
        self.0.lock().unwrap().iter().filter(|(op, _)| op == operation).count()
    }

    /// The parameters of the last request of `operation`.
    fn last(&self, operation: &str) -> Vec<(String, String)> {
        let sent = self.0.lock().unwrap();
        sent.iter().rev().find(|(op, _)| op == operation).map(|(_, p)| p.clone()).unwrap_or_default()
    }
}

impl Intercept for Requests {
    fn name(&self) -> &'static str {
        "Requests"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let request = context.request();
        let body =
            request.body().bytes().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
        let (operation, parameters) = match request.headers().get("x-amz-target") {
            // SSM: `AmazonSSM.GetParameter`, a JSON body.
            Some(target) => {
                (target.rsplit('.').next().unwrap_or_default().to_owned(), vec![("".into(), body)])
            }
            // SNS: `Action=Publish&...`, form-encoded.
            None => {
                let url = reqwest::Url::parse(&format!("http://form/?{body}"))?;
                let parameters: Vec<(String, String)> =
                    url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
                let action = parameters.iter().find(|(k, _)| k == "Action").map(|(_, v)| v.clone());
                (action.unwrap_or_default(), parameters)
            }
        };
        self.0.lock().unwrap().push((operation, parameters));
        Ok(())
    }
}

fn unique(name: &str) -> String {
    format!("{name}-{:x}", rand::random::<u32>())
}

/// A platform application on moto, as the operator makes one for the stack.
async fn application(moto: &MotoServer, platform: &str) -> String {
    let sns = aws_sdk_sns::Client::new(&moto.sdk_config());
    let created = sns
        .create_platform_application()
        .name(unique("courier"))
        .platform(platform)
        .attributes("PlatformCredential", "test")
        .send()
        .await
        .expect("creating a platform application on moto");
    created.platform_application_arn.expect("an application ARN")
}

/// The endpoints of `application` on moto: (ARN, token, enabled).
async fn endpoints(moto: &MotoServer, application: &str) -> Vec<(String, String, String)> {
    let sns = aws_sdk_sns::Client::new(&moto.sdk_config());
    let listed =
        sns.list_endpoints_by_platform_application().platform_application_arn(application).send().await;
    let mut out: Vec<_> = listed
        .expect("listing endpoints")
        .endpoints()
        .iter()
        .map(|e| {
            let attribute =
                |name: &str| e.attributes().and_then(|a| a.get(name)).cloned().unwrap_or_default();
            (e.endpoint_arn().unwrap_or_default().to_owned(), attribute("Token"), attribute("Enabled"))
        })
        .collect();
    out.sort();
    out
}

/// What moto recorded as published to an endpoint (its model dump at /moto-api/data.json).
async fn published_to(moto: &MotoServer, endpoint: &str) -> Vec<String> {
    let url = format!("{}/moto-api/data.json", moto.endpoint());
    let dump: Value = serde_json::from_str(&reqwest::get(&url).await.unwrap().text().await.unwrap()).unwrap();
    let endpoints = dump["sns"]["PlatformEndpoint"].as_array().cloned().unwrap_or_default();
    let ours = endpoints.iter().find(|e| e["arn"] == endpoint).expect("moto knows the endpoint");
    ours["messages"]
        .as_object()
        .map(|m| m.values().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap()
}

fn wakeups(moto: &MotoServer, settings: WakeSettings) -> (SnsWakeups, Requests) {
    let requests = Requests::default();
    let wakeups =
        SnsWakeups::new(&moto.sdk_config(), Some(SharedInterceptor::new(requests.clone())), settings);
    (wakeups, requests)
}

fn token(platform: Platform, token: &str) -> PushRegistration {
    PushRegistration { platform, address: token.into(), keys: None, endpoint: None }
}

fn who() -> (UserId, DeviceId) {
    (UserId::try_from("alice@example.com").unwrap(), DeviceId::try_from("phone-1").unwrap())
}

#[tokio::test]
async fn an_endpoint_is_made_once_per_token() {
    let moto = moto::shared().await;
    let fcm = application(moto, "GCM").await;
    let (w, requests) =
        wakeups(moto, WakeSettings { fcm_application: Some(fcm.clone()), ..Default::default() });
    assert!(w.serves(Platform::Fcm));
    for off in [Platform::Apns, Platform::ApnsSandbox, Platform::WebPush] {
        assert!(!w.serves(off), "{off:?} is not configured");
        let refused = w.prepare(token(off, "t"), None).await.unwrap_err();
        assert!(matches!(refused, courier_core::Error::BadRequest(_)), "{refused:?}");
    }
    assert_eq!(requests.count("CreatePlatformEndpoint"), 0, "a platform that is off calls nothing");

    let first = w.prepare(token(Platform::Fcm, "token-1"), None).await.unwrap();
    let e1 = first.endpoint.clone().expect("an endpoint");
    assert!(e1.starts_with(&fcm.replace(":app/", ":endpoint/")), "{e1} is the application's");
    assert_eq!(endpoints(moto, &fcm).await, vec![(e1.clone(), "token-1".into(), "true".into())]);
    assert_eq!(requests.count("CreatePlatformEndpoint"), 1);

    // The app registers the same token again (it does so on every start).
    let again = w.prepare(token(Platform::Fcm, "token-1"), Some(&first)).await.unwrap();
    assert_eq!(again, first);
    assert_eq!(requests.count("CreatePlatformEndpoint"), 1, "the same token makes no endpoint");
    assert_eq!(requests.count("DeleteEndpoint"), 0);

    // A new token: a new endpoint, and the old one goes.
    let second = w.prepare(token(Platform::Fcm, "token-2"), Some(&again)).await.unwrap();
    let e2 = second.endpoint.clone().expect("an endpoint");
    assert_ne!(e2, e1);
    assert_eq!(requests.count("CreatePlatformEndpoint"), 2);
    let deleted = requests.last("DeleteEndpoint");
    assert!(deleted.contains(&("EndpointArn".into(), e1)), "{deleted:?}");
    assert_eq!(endpoints(moto, &fcm).await, vec![(e2, "token-2".into(), "true".into())]);

    w.release(&second).await.unwrap();
    assert!(endpoints(moto, &fcm).await.is_empty(), "release deletes the endpoint");
    w.release(&second).await.unwrap();
}

#[tokio::test]
async fn a_wake_up_publishes_nothing_but_that_there_is_something_to_sync() {
    let moto = moto::shared().await;
    let (fcm, apns) = (application(moto, "GCM").await, application(moto, "APNS").await);
    let settings =
        WakeSettings { fcm_application: Some(fcm), apns_application: Some(apns), ..Default::default() };
    let (w, requests) = wakeups(moto, settings);
    let (user, device) = who();

    let phone = w.prepare(token(Platform::Apns, "a1b2c3"), None).await.unwrap();
    assert_eq!(w.wake(&user, &device, &phone).await.unwrap(), Woken::Sent);
    let endpoint = phone.endpoint.as_deref().unwrap();
    let published = published_to(moto, endpoint).await;
    assert_eq!(published.len(), 1, "{published:?}");
    let message: Value = serde_json::from_str(&published[0]).unwrap();
    let apns: Value = serde_json::from_str(message["APNS"].as_str().unwrap()).unwrap();
    assert_eq!(apns["aps"]["alert"], serde_json::json!({"loc-key": APNS_WAKE_LOC_KEY}));
    assert_eq!(apns["aps"]["mutable-content"], 1);

    // The request as SNS got it: json per platform, APNs headers as attributes.
    let sent = requests.last("Publish");
    let field = |name: &str| sent.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    assert_eq!(field("TargetArn"), Some(endpoint));
    assert_eq!(field("MessageStructure"), Some("json"));
    let attributes: Vec<(&str, &str)> = (1..=4)
        .filter_map(|i| {
            let name = field(&format!("MessageAttributes.entry.{i}.Name"))?;
            Some((name, field(&format!("MessageAttributes.entry.{i}.Value.StringValue"))?))
        })
        .collect();
    for expected in [("AWS.SNS.MOBILE.APNS.PUSH_TYPE", "alert"), ("AWS.SNS.MOBILE.APNS.PRIORITY", "10")] {
        assert!(attributes.contains(&expected), "{expected:?} in {attributes:?}");
    }

    let android = w.prepare(token(Platform::Fcm, "fcm-token"), None).await.unwrap();
    assert_eq!(w.wake(&user, &device, &android).await.unwrap(), Woken::Sent);
    let published = published_to(moto, android.endpoint.as_deref().unwrap()).await;
    let message: Value = serde_json::from_str(&published[0]).unwrap();
    let gcm: Value = serde_json::from_str(message["GCM"].as_str().unwrap()).unwrap();
    assert_eq!(gcm["fcmV1Message"]["message"]["data"], serde_json::json!({"type": "wake"}));
    assert_eq!(gcm["fcmV1Message"]["message"]["android"]["priority"], "high");

    // Content-free: nothing names the user, the device or the message, in
    // any request (the token is the one thing SNS must be told).
    for (operation, parameters) in requests.0.lock().unwrap().iter() {
        for (_, value) in parameters {
            for secret in [user.as_str(), device.as_str(), "alice"] {
                assert!(!value.contains(secret), "{operation} carries {secret}: {value}");
            }
        }
    }
}

#[tokio::test]
async fn a_disabled_endpoint_is_gone_and_a_returning_token_enabled_again() {
    let moto = moto::shared().await;
    let apns = application(moto, "APNS_SANDBOX").await;
    let (w, _) =
        wakeups(moto, WakeSettings { apns_sandbox_application: Some(apns.clone()), ..Default::default() });
    let sns = aws_sdk_sns::Client::new(&moto.sdk_config());
    let (user, device) = who();
    let disable = |endpoint: String| {
        let sns = sns.clone();
        async move {
            sns.set_endpoint_attributes()
                .endpoint_arn(endpoint)
                .attributes("Enabled", "false")
                .send()
                .await
                .unwrap();
        }
    };

    // APNs told SNS the token is dead; SNS disabled the endpoint.
    let phone = w.prepare(token(Platform::ApnsSandbox, "dead"), None).await.unwrap();
    let endpoint = phone.endpoint.clone().unwrap();
    disable(endpoint.clone()).await;
    assert_eq!(w.wake(&user, &device, &phone).await.unwrap(), Woken::Gone);
    assert!(published_to(moto, &endpoint).await.is_empty());
    // The core then forgets the registration and releases it.
    w.release(&phone).await.unwrap();
    assert!(endpoints(moto, &apns).await.is_empty());
    // Deleted (by that release, or another device's with the same token): gone too.
    assert_eq!(w.wake(&user, &device, &phone).await.unwrap(), Woken::Gone);

    // A disabled endpoint still there, and the app registers its token anew:
    // SNS names the old endpoint, which serves again.
    let back = w.prepare(token(Platform::ApnsSandbox, "back"), None).await.unwrap();
    disable(back.endpoint.clone().unwrap()).await;
    let again = w.prepare(token(Platform::ApnsSandbox, "back"), None).await.unwrap();
    assert_eq!(again.endpoint, back.endpoint);
    assert_eq!(
        endpoints(moto, &apns).await,
        vec![(again.endpoint.clone().unwrap(), "back".into(), "true".into())]
    );
    assert_eq!(w.wake(&user, &device, &again).await.unwrap(), Woken::Sent);

    // An endpoint of another application (the parameter changed since) is
    // not published to: the app registers again.
    let elsewhere = PushRegistration {
        endpoint: Some(apns.replace(":app/", ":endpoint/").replace("courier-", "other-") + "/x"),
        ..again.clone()
    };
    assert_eq!(w.wake(&user, &device, &elsewhere).await.unwrap(), Woken::Gone);
}

#[tokio::test]
async fn the_vapid_key_is_read_from_ssm_once_on_first_use() {
    let moto = moto::shared().await;
    let key = VapidKey::generate("mailto:ops@example.com").unwrap();
    let parameter = format!("/{}/vapid", unique("courier"));
    let ssm = aws_sdk_ssm::Client::new(&moto.sdk_config());
    ssm.put_parameter()
        .name(&parameter)
        .value(key.to_base64url())
        .r#type(ParameterType::SecureString)
        .send()
        .await
        .expect("putting the parameter on moto");
    let settings = WakeSettings {
        vapid_parameter: Some(parameter),
        push_subject: "mailto:ops@example.com".into(),
        ..Default::default()
    };
    let (w, requests) = wakeups(moto, settings.clone());
    assert!(w.serves(Platform::WebPush));
    assert!(!w.serves(Platform::Fcm));

    // Registering checks the subscription, and reads no key.
    let subscription = |endpoint: &str| PushRegistration {
        platform: Platform::WebPush,
        address: endpoint.into(),
        keys: Some(WebPushKeys {
            p256dh: VapidKey::generate("mailto:ops@example.com").unwrap().public_key().to_owned(),
            auth: URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>()),
        }),
        endpoint: None,
    };
    let browser = subscription("https://8.8.8.8/push/abc");
    assert_eq!(w.prepare(browser.clone(), None).await.unwrap(), browser);
    for refused in ["http://127.0.0.1:9/push", "https://10.0.0.1/push", "https://[::1]/push"] {
        let e = w.prepare(subscription(refused), None).await.unwrap_err();
        assert!(matches!(e, courier_core::Error::BadRequest(_)), "{refused}: {e:?}");
    }
    assert_eq!(requests.count("GetParameter"), 0, "nothing reads the key until a wake-up needs it");

    assert_eq!(w.vapid_public_key().await.unwrap().as_deref(), Some(key.public_key()));
    assert_eq!(requests.count("GetParameter"), 1);
    assert!(requests.last("GetParameter")[0].1.contains(r#""WithDecryption":true"#));
    // Deployed, a wake-up goes to public hosts only: a stored endpoint that
    // resolves to loopback is refused, not reached, and not retried.
    let (user, device) = who();
    let e = w.wake(&user, &device, &subscription("https://localhost:9/push")).await.unwrap_err();
    assert!(!e.is_retryable(), "{e}");
    assert_eq!(w.vapid_public_key().await.unwrap().as_deref(), Some(key.public_key()));
    assert_eq!(requests.count("GetParameter"), 1, "read once, kept");

    // A parameter that is not there fails the wake-up, and is read again next time.
    let missing = WakeSettings { vapid_parameter: Some("/courier/missing".into()), ..settings };
    let (w, requests) = wakeups(moto, missing);
    assert!(w.vapid_public_key().await.is_err());
    assert!(w.vapid_public_key().await.is_err());
    assert_eq!(requests.count("GetParameter"), 2, "a failed read is not kept");
}
