//! `SnsWakeups`, the deployed `Wakeups`: FCM and APNs through Amazon SNS platform endpoints, Web Push sent directly with the stack's VAPID key from SSM.
//!
//! A wake-up says only that there is something to `sync` (PROTOCOL.md,
//! "Push notifications to devices that are not connected"): every payload
//! here is a constant but for the collapse key, a hash of the registration's
//! own address (`courier_wake::collapse_key`).
//!
//! FCM and APNs: `registerPush` makes one SNS platform endpoint per token
//! (`prepare`), only when the token is new to the device, and a wake-up is a
//! Publish to it. SNS learns from FCM and APNs that a token is dead and
//! disables the endpoint; the next Publish answers `EndpointDisabled`, which
//! is [`Woken::Gone`] (the core then forgets the registration and
//! `release` deletes the endpoint).
//!
//! Web Push: [`WebPushSender`] in its deployed mode (https endpoints on
//! public addresses only). Its VAPID private key is an SSM SecureString,
//! read the first time a wake-up needs it, so a function that never sends
//! one never calls SSM.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sns::error::ProvideErrorMetadata;
use aws_sdk_sns::operation::create_platform_endpoint::CreatePlatformEndpointError;
use aws_sdk_sns::operation::publish::PublishError;
use aws_sdk_sns::types::MessageAttributeValue;
use courier_core::error::{Error, Result};
use courier_core::ids::{DeviceId, UserId};
use courier_core::ports::{Platform, PushRegistration, Wakeups, Woken};
use courier_wake::webpush::WAKE_PAYLOAD;
use courier_wake::{VapidKey, WebPushOptions, WebPushSender, collapse_key};
use serde_json::json;
use tokio::sync::OnceCell;
use tracing::instrument;

use crate::sdk_error;

/// The SNS platform application of FCM (`arn:...:app/GCM/NAME`); empty: FCM is off.
pub const FCM_APPLICATION_ENV: &str = "COURIER_FCM_APPLICATION_ARN";
/// The SNS platform application of APNs (`arn:...:app/APNS/NAME`); empty: off.
pub const APNS_APPLICATION_ENV: &str = "COURIER_APNS_APPLICATION_ARN";
/// The SNS platform application of APNs' sandbox (`arn:...:app/APNS_SANDBOX/NAME`); empty: off.
pub const APNS_SANDBOX_APPLICATION_ENV: &str = "COURIER_APNS_SANDBOX_APPLICATION_ARN";
/// The name of the SSM SecureString holding the VAPID private key
/// (base64url, as `VapidKey::to_base64url` writes it); empty: Web Push is off.
pub const VAPID_PARAMETER_ENV: &str = "COURIER_VAPID_PARAMETER";
/// The VAPID contact (`mailto:` or `https:`), required with a VAPID key.
pub const PUSH_SUBJECT_ENV: &str = "COURIER_PUSH_SUBJECT";

/// How long the push services keep a wake-up for a device that is off: four
/// weeks, as for Web Push (`WebPushOptions`), within the 30 days an inbox
/// keeps its messages. Collapsing keeps it to one.
const WAKE_TTL: Duration = Duration::from_secs(28 * 24 * 60 * 60);

/// How long one SNS call may take before it is abandoned as a retryable
/// failure, well within the wake function's 30 s.
const SNS_TIMEOUT: Duration = Duration::from_secs(10);

/// What turns each platform on: the stack's parameters, through the environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WakeSettings {
    pub fcm_application: Option<String>,
    pub apns_application: Option<String>,
    pub apns_sandbox_application: Option<String>,
    pub vapid_parameter: Option<String>,
    pub push_subject: String,
}

impl WakeSettings {
    /// Reads the settings from the environment: every variable must be set
    /// (empty turns its platform off), and a wrong one fails here, by name,
    /// not at the first wake-up.
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| {
            std::env::var(name)
                .map_err(|_| Error::internal(format!("environment variable {name} is not set")))
                .map(|v| Some(v.trim().to_owned()).filter(|v| !v.is_empty()))
        };
        let settings = Self {
            fcm_application: var(FCM_APPLICATION_ENV)?,
            apns_application: var(APNS_APPLICATION_ENV)?,
            apns_sandbox_application: var(APNS_SANDBOX_APPLICATION_ENV)?,
            vapid_parameter: var(VAPID_PARAMETER_ENV)?,
            push_subject: var(PUSH_SUBJECT_ENV)?.unwrap_or_default(),
        };
        settings.check()?;
        Ok(settings)
    }

    fn check(&self) -> Result<()> {
        for (name, arn, platform) in [
            (FCM_APPLICATION_ENV, &self.fcm_application, "GCM"),
            (APNS_APPLICATION_ENV, &self.apns_application, "APNS"),
            (APNS_SANDBOX_APPLICATION_ENV, &self.apns_sandbox_application, "APNS_SANDBOX"),
        ] {
            if let Some(arn) = arn
                && !(arn.starts_with("arn:") && arn.contains(&format!(":app/{platform}/")))
            {
                return Err(Error::internal(format!(
                    "{name} is not the ARN of an SNS {platform} platform application"
                )));
            }
        }
        if self.vapid_parameter.is_some() && self.push_subject.is_empty() {
            return Err(Error::internal(format!(
                "{PUSH_SUBJECT_ENV} must be set with {VAPID_PARAMETER_ENV}"
            )));
        }
        Ok(())
    }

    /// The platform application of an SNS platform; `None` when it is off (or is Web Push).
    fn application(&self, platform: Platform) -> Option<&str> {
        match platform {
            Platform::Fcm => self.fcm_application.as_deref(),
            Platform::Apns => self.apns_application.as_deref(),
            Platform::ApnsSandbox => self.apns_sandbox_application.as_deref(),
            Platform::WebPush => None,
        }
    }
}

/// The ARNs of an application's endpoints start with this:
/// `arn:aws:sns:R:A:app/GCM/NAME` -> `arn:aws:sns:R:A:endpoint/GCM/NAME/`.
fn endpoint_prefix(application: &str) -> String {
    format!("{}/", application.replacen(":app/", ":endpoint/", 1))
}

/// Wakes devices on the deployed stack. Cheap to share; builds no
/// connection until its first call.
pub struct SnsWakeups {
    sns: aws_sdk_sns::Client,
    settings: WakeSettings,
    web_push: Option<LazyWebPush>,
}

impl std::fmt::Debug for SnsWakeups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnsWakeups").field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// The Web Push sender, made on first use from the key in SSM.
struct LazyWebPush {
    ssm: aws_sdk_ssm::Client,
    parameter: String,
    subject: String,
    options: WebPushOptions,
    sender: OnceCell<WebPushSender>,
}

impl LazyWebPush {
    /// The sender, reading the key the first time. A failed read is not
    /// kept: the next wake-up tries again (a throttled GetParameter is a
    /// retryable error like any other).
    async fn sender(&self) -> Result<&WebPushSender> {
        self.sender
            .get_or_try_init(|| async {
                let out = self
                    .ssm
                    .get_parameter()
                    .name(&self.parameter)
                    .with_decryption(true)
                    .send()
                    .await
                    .map_err(sdk_error)?;
                let private = out.parameter().and_then(|p| p.value()).ok_or_else(|| {
                    Error::internal(format!("the SSM parameter {} has no value", self.parameter))
                })?;
                let key = VapidKey::from_base64url(private, &self.subject)?;
                tracing::info!(public_key = key.public_key(), "VAPID key read from SSM");
                WebPushSender::new(key, self.options.clone())
            })
            .await
    }
}

impl SnsWakeups {
    /// The wake-ups of `settings`, with clients built from `config` (and
    /// `interceptor` on them, as `Aws::watched` puts one on every client).
    pub fn new(
        config: &aws_config::SdkConfig,
        interceptor: Option<aws_sdk_sns::config::SharedInterceptor>,
        settings: WakeSettings,
    ) -> Self {
        // The config's timeouts (its connect timeout) and a bound on each call.
        let timeouts = match config.timeout_config() {
            Some(given) => given.to_builder(),
            None => aws_sdk_sns::config::timeout::TimeoutConfig::builder(),
        }
        .operation_timeout(SNS_TIMEOUT)
        .build();
        let mut sns = aws_sdk_sns::config::Builder::from(config).timeout_config(timeouts);
        if let Some(interceptor) = &interceptor {
            sns.push_interceptor(interceptor.clone());
        }
        let web_push = settings.vapid_parameter.clone().map(|parameter| {
            let mut ssm = aws_sdk_ssm::config::Builder::from(config);
            if let Some(interceptor) = interceptor {
                ssm.push_interceptor(interceptor);
            }
            LazyWebPush {
                ssm: aws_sdk_ssm::Client::from_conf(ssm.build()),
                parameter,
                subject: settings.push_subject.clone(),
                // Deployed: https endpoints on public addresses only.
                options: WebPushOptions { public_hosts_only: true, ..WebPushOptions::default() },
                sender: OnceCell::new(),
            }
        });
        Self { sns: aws_sdk_sns::Client::from_conf(sns.build()), settings, web_push }
    }

    /// The public half of the VAPID key, the `applicationServerKey` browsers
    /// subscribe with (read from SSM on first use); `None` when Web Push is off.
    pub async fn vapid_public_key(&self) -> Result<Option<String>> {
        match &self.web_push {
            Some(web_push) => Ok(Some(web_push.sender().await?.vapid_key().public_key().to_owned())),
            None => Ok(None),
        }
    }

    /// An endpoint for `token` in `application`. SNS makes one per token and
    /// hands back the same one for the same token; one it disabled (a token
    /// that FCM or APNs once refused and the app now registers again) it
    /// names in an error instead, and is enabled again here.
    async fn create_endpoint(&self, application: &str, token: &str) -> Result<String> {
        let created = self
            .sns
            .create_platform_endpoint()
            .platform_application_arn(application)
            .token(token)
            // No CustomUserData: it would tell SNS who the user is, and make
            // the same token under another account a conflict.
            .attributes("Enabled", "true")
            .send()
            .await;
        let error = match created {
            Ok(out) => {
                return out
                    .endpoint_arn
                    .ok_or_else(|| Error::internal("CreatePlatformEndpoint answered no EndpointArn"));
            }
            Err(e) => e,
        };
        let Some(CreatePlatformEndpointError::InvalidParameterException(refused)) = error.as_service_error()
        else {
            return Err(sdk_error(error));
        };
        let prefix = endpoint_prefix(application);
        let existing = refused
            .message()
            .unwrap_or_default()
            .split_whitespace()
            .find(|word| word.starts_with(&prefix))
            .map(|arn| arn.trim_end_matches([',', '.']).to_owned());
        let Some(existing) = existing else {
            // The token itself, as SNS checks it (an APNs token that is not
            // hex, say). SNS's text is left out: it may quote the token.
            tracing::warn!(code = refused.code(), "SNS refused a device token");
            return Err(Error::BadRequest("token: refused by the push service".into()));
        };
        self.sns
            .set_endpoint_attributes()
            .endpoint_arn(&existing)
            .attributes("Enabled", "true")
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(existing)
    }

    async fn delete_endpoint(&self, endpoint: &str) -> Result<()> {
        // Idempotent: an endpoint already gone is no error.
        self.sns.delete_endpoint().endpoint_arn(endpoint).send().await.map_err(sdk_error)?;
        Ok(())
    }

    async fn publish(&self, platform: Platform, registration: &PushRegistration) -> Result<Woken> {
        let Some(application) = self.settings.application(platform) else {
            // Turned off since the device registered: kept, in case it comes back.
            return Err(Error::internal(format!("push platform {} is turned off", platform.name())));
        };
        // A registration whose endpoint is not of the configured application
        // (made before the parameter changed) cannot be published to.
        let Some(endpoint) =
            registration.endpoint.as_deref().filter(|e| e.starts_with(&endpoint_prefix(application)))
        else {
            return Ok(Woken::Gone);
        };
        let wake = wake_message(platform, &registration.address);
        let mut publish =
            self.sns.publish().target_arn(endpoint).message_structure("json").message(wake.message);
        for (name, value) in wake.attributes {
            let value = MessageAttributeValue::builder()
                .data_type("String")
                .string_value(value)
                .build()
                .map_err(Error::internal)?;
            publish = publish.message_attributes(name, value);
        }
        match publish.send().await {
            Ok(_) => Ok(Woken::Sent),
            // FCM or APNs said the token is dead, and SNS disabled the endpoint.
            Err(e) if matches!(e.as_service_error(), Some(PublishError::EndpointDisabledException(_))) => {
                Ok(Woken::Gone)
            }
            // Deleted: by an earlier release, or by the release of another
            // device registered with the same token (two accounts in one
            // app share SNS's one endpoint per token). The app registers
            // again when it next runs.
            Err(e) if matches!(e.as_service_error(), Some(PublishError::NotFoundException(_))) => {
                Ok(Woken::Gone)
            }
            Err(e) => Err(sdk_error(e)),
        }
    }
}

#[async_trait]
impl Wakeups for SnsWakeups {
    fn serves(&self, platform: Platform) -> bool {
        match platform {
            Platform::WebPush => self.web_push.is_some(),
            other => self.settings.application(other).is_some(),
        }
    }

    #[instrument(skip_all, fields(platform = registration.platform.name()))]
    async fn prepare(
        &self,
        registration: PushRegistration,
        previous: Option<&PushRegistration>,
    ) -> Result<PushRegistration> {
        let platform = registration.platform;
        if !self.serves(platform) {
            return Err(Error::BadRequest(format!(
                "push platform {} is turned off on this server",
                platform.name()
            )));
        }
        let ready = match (platform, self.settings.application(platform)) {
            (Platform::WebPush, _) => {
                let keys = registration
                    .keys
                    .as_ref()
                    .ok_or_else(|| Error::BadRequest("subscription: keys are required".into()))?;
                // The checks WebPushSender::check makes, without the key it
                // holds: registering reads nothing from SSM.
                let endpoint = &registration.address;
                courier_wake::check_subscription(endpoint, &keys.p256dh, &keys.auth, false)
                    .map_err(bad_request)?;
                courier_wake::check_public_endpoint(endpoint).await.map_err(bad_request)?;
                PushRegistration { endpoint: None, ..registration }
            }
            (_, Some(application)) => {
                // The same token on the same application: its endpoint serves.
                let reusable = previous
                    .filter(|p| p.platform == platform && p.address == registration.address)
                    .and_then(|p| p.endpoint.clone())
                    .filter(|e| e.starts_with(&endpoint_prefix(application)));
                let endpoint = match reusable {
                    Some(endpoint) => endpoint,
                    None => self.create_endpoint(application, &registration.address).await?,
                };
                PushRegistration { keys: None, endpoint: Some(endpoint), ..registration }
            }
            (_, None) => unreachable!("serves() said the platform is on"),
        };
        // The old token's endpoint serves no one now. Failing to delete it
        // leaves an idle endpoint (SNS charges nothing for one), so the new
        // registration stands.
        if let Some(old) = previous.and_then(|p| p.endpoint.as_deref())
            && ready.endpoint.as_deref() != Some(old)
            && let Err(e) = self.delete_endpoint(old).await
        {
            tracing::warn!(error = %e, "deleting the endpoint of a replaced push registration failed");
        }
        Ok(ready)
    }

    #[instrument(skip_all, fields(user = %user, device = %device, platform = registration.platform.name()))]
    async fn wake(&self, user: &UserId, device: &DeviceId, registration: &PushRegistration) -> Result<Woken> {
        match registration.platform {
            Platform::WebPush => {
                let web_push =
                    self.web_push.as_ref().ok_or_else(|| Error::internal("Web Push is turned off"))?;
                let keys = registration
                    .keys
                    .as_ref()
                    .ok_or_else(|| Error::internal("a Web Push registration without keys"))?;
                web_push.sender().await?.send(&registration.address, keys).await
            }
            platform => self.publish(platform, registration).await,
        }
    }

    async fn release(&self, registration: &PushRegistration) -> Result<()> {
        match registration.endpoint.as_deref() {
            Some(endpoint) => self.delete_endpoint(endpoint).await,
            None => Ok(()),
        }
    }
}

fn bad_request(message: &str) -> Error {
    Error::BadRequest(message.to_owned())
}

/// What is published for one wake-up.
#[derive(Debug, PartialEq)]
struct WakeMessage {
    /// `MessageStructure: json`: a payload per platform key, and the
    /// `default` SNS requires of that form (the same constant).
    message: String,
    /// SNS's reserved attributes that become APNs headers.
    attributes: Vec<(&'static str, String)>,
}

/// Where APNs shows a wake-up, it shows this string of the app's own
/// `Localizable.strings` (say, "New message"), not anything of the message.
pub const APNS_WAKE_LOC_KEY: &str = "COURIER_WAKE";

/// The wake-up for `platform`, collapsed per `address` (the token).
///
/// APNs has no high-priority push without an alert: a push of only
/// `content-available` must be `apns-push-type: background` at
/// `apns-priority: 5`, which iOS delays, batches, throttles to a few an
/// hour and never delivers to an app the user swiped away, and priority 10
/// without an alert is refused as a misconfiguration. So an APNs wake-up is
/// an alert push at priority 10 whose alert is a localization key, the same
/// constant for every message, with `mutable-content` so the app's
/// notification service extension runs, syncs and replaces the text with
/// what it decrypts (the way end-to-end encrypted messengers do it), and
/// `content-available` so the app itself is also woken when iOS allows.
/// Nothing of the message leaves through Apple.
///
/// FCM: a data-only message at `android.priority: high` (delivered at once,
/// and the app's own code runs), with the same APNs form for apps that reach
/// iOS through FCM.
fn wake_message(platform: Platform, address: &str) -> WakeMessage {
    let collapse = collapse_key(address);
    let wake = std::str::from_utf8(WAKE_PAYLOAD).unwrap_or(r#"{"type":"wake"}"#);
    let aps = json!({
        "aps": {"alert": {"loc-key": APNS_WAKE_LOC_KEY}, "mutable-content": 1, "content-available": 1},
        "type": "wake",
    });
    let ttl = WAKE_TTL.as_secs().to_string();
    let (key, payload, attributes) = match platform {
        Platform::Apns | Platform::ApnsSandbox => {
            let ttl_attribute = match platform {
                Platform::Apns => "AWS.SNS.MOBILE.APNS.TTL",
                _ => "AWS.SNS.MOBILE.APNS_SANDBOX.TTL",
            };
            let key = if platform == Platform::Apns { "APNS" } else { "APNS_SANDBOX" };
            let attributes = vec![
                ("AWS.SNS.MOBILE.APNS.PUSH_TYPE", "alert".to_owned()),
                ("AWS.SNS.MOBILE.APNS.PRIORITY", "10".to_owned()),
                ("AWS.SNS.MOBILE.APNS.COLLAPSE_ID", collapse),
                (ttl_attribute, ttl),
            ];
            (key, aps, attributes)
        }
        _ => {
            let fcm = json!({"fcmV1Message": {"message": {
                "data": {"type": "wake"},
                "android": {"priority": "high", "collapse_key": collapse, "ttl": format!("{ttl}s")},
                "apns": {
                    "headers": {"apns-push-type": "alert", "apns-priority": "10", "apns-collapse-id": collapse},
                    "payload": aps,
                },
            }}});
            ("GCM", fcm, Vec::new())
        }
    };
    let message = json!({ "default": wake, key: payload.to_string() }).to_string();
    WakeMessage { message, attributes }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> WakeSettings {
        WakeSettings {
            fcm_application: Some("arn:aws:sns:eu-west-1:123456789012:app/GCM/courier".into()),
            apns_application: Some("arn:aws:sns:eu-west-1:123456789012:app/APNS/courier".into()),
            apns_sandbox_application: None,
            vapid_parameter: Some("/courier/vapid".into()),
            push_subject: "mailto:ops@example.com".into(),
        }
    }

    #[test]
    fn settings_that_cannot_work_fail_at_start() {
        assert!(settings().check().is_ok());
        assert!(WakeSettings::default().check().is_ok(), "everything off is a valid stack");
        let swapped = WakeSettings { fcm_application: settings().apns_application, ..settings() };
        let e = swapped.check().unwrap_err();
        assert!(e.to_string().contains(FCM_APPLICATION_ENV), "{e}");
        let no_subject = WakeSettings { push_subject: String::new(), ..settings() };
        assert!(no_subject.check().unwrap_err().to_string().contains(PUSH_SUBJECT_ENV));
    }

    #[test]
    fn endpoints_are_named_under_their_application() {
        assert_eq!(
            endpoint_prefix("arn:aws:sns:eu-west-1:123456789012:app/APNS_SANDBOX/courier"),
            "arn:aws:sns:eu-west-1:123456789012:endpoint/APNS_SANDBOX/courier/"
        );
    }

    /// The payload of `key` in a published message, parsed.
    fn payload(message: &str, key: &str) -> serde_json::Value {
        let outer: serde_json::Value = serde_json::from_str(message).unwrap();
        assert_eq!(outer["default"], r#"{"type":"wake"}"#, "the default is content-free too");
        serde_json::from_str(outer[key].as_str().unwrap()).unwrap()
    }

    #[test]
    fn wake_ups_are_content_free_high_priority_and_collapsed() {
        let collapse = collapse_key("token-a");
        let fcm = wake_message(Platform::Fcm, "token-a");
        assert!(fcm.attributes.is_empty());
        let message = &payload(&fcm.message, "GCM")["fcmV1Message"]["message"];
        assert_eq!(message["data"], json!({"type": "wake"}));
        assert!(message["notification"].is_null(), "data only: the app's code runs");
        assert_eq!(message["android"]["priority"], "high");
        assert_eq!(message["android"]["collapse_key"], collapse);
        assert_eq!(message["apns"]["headers"]["apns-priority"], "10");

        for (platform, key, ttl) in [
            (Platform::Apns, "APNS", "AWS.SNS.MOBILE.APNS.TTL"),
            (Platform::ApnsSandbox, "APNS_SANDBOX", "AWS.SNS.MOBILE.APNS_SANDBOX.TTL"),
        ] {
            let apns = wake_message(platform, "token-a");
            let aps = &payload(&apns.message, key)["aps"];
            assert_eq!(aps["alert"], json!({"loc-key": APNS_WAKE_LOC_KEY}), "a constant, not the message");
            assert_eq!(aps["mutable-content"], 1);
            let attribute =
                |name: &str| apns.attributes.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str());
            assert_eq!(attribute("AWS.SNS.MOBILE.APNS.PUSH_TYPE"), Some("alert"));
            assert_eq!(attribute("AWS.SNS.MOBILE.APNS.PRIORITY"), Some("10"));
            assert_eq!(attribute("AWS.SNS.MOBILE.APNS.COLLAPSE_ID"), Some(collapse.as_str()));
            assert_eq!(attribute(ttl), Some("2419200"));
        }
        assert_ne!(wake_message(Platform::Fcm, "token-b"), fcm, "collapsed per token");
    }
}
