//! `Unwired`: the stand-in for a port a deployed function never calls.

use async_trait::async_trait;

use super::{
    Attachment, Blobs, Job, Jobs, MessageRetention, Posted, Presigned, Push, PushRegistration, Wakeups, Woken,
};
use crate::domain::Millis;
use crate::error::{Error, Result};
use crate::ids::{ConnectionId, DeviceId, UserId};
use crate::protocol::Platform;

/// A port a function is built without. A port is a trait object, and a
/// trait object links every method of its adapter, called or not: a Lambda
/// that wires S3 or SNS only where its command uses them stays small
/// (docs/benchmarks.md). Calling it is a wiring bug, reported by port name.
#[derive(Clone, Copy, Debug, Default)]
pub struct Unwired;

impl Unwired {
    fn call<T>(port: &str) -> Result<T> {
        Err(Error::internal(format!("the {port} port is not wired in this build")))
    }
}

#[async_trait]
impl Blobs for Unwired {
    async fn presign_upload(&self, _: &Attachment, _: Millis) -> Result<Presigned> {
        Self::call("blobs")
    }
    async fn presign_download(&self, _: &Attachment, _: Millis) -> Result<Presigned> {
        Self::call("blobs")
    }
    async fn uploaded(&self, _: &Attachment) -> Result<bool> {
        Self::call("blobs")
    }
    async fn delete(&self, _: &Attachment) -> Result<()> {
        Self::call("blobs")
    }
}

#[async_trait]
impl Push for Unwired {
    async fn post(&self, _: &ConnectionId, _: &str) -> Result<Posted> {
        Self::call("push")
    }
    async fn close(&self, _: &ConnectionId) -> Result<()> {
        Self::call("push")
    }
}

#[async_trait]
impl MessageRetention for Unwired {
    async fn expire_messages(&self, _: Millis, _: Millis) -> Result<u64> {
        Self::call("retention")
    }
}

#[async_trait]
impl Jobs for Unwired {
    async fn enqueue(&self, _: &Job, _: std::time::Duration) -> Result<()> {
        Self::call("jobs")
    }
}

/// Serves no platform: registerPush on it refuses every platform as turned off.
#[async_trait]
impl Wakeups for Unwired {
    fn serves(&self, _: Platform) -> bool {
        false
    }
    async fn prepare(&self, _: PushRegistration, _: Option<&PushRegistration>) -> Result<PushRegistration> {
        Self::call("wakeups")
    }
    async fn wake(&self, _: &UserId, _: &DeviceId, _: &PushRegistration) -> Result<Woken> {
        Self::call("wakeups")
    }
    async fn release(&self, _: &PushRegistration) -> Result<()> {
        Self::call("wakeups")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn says_which_port_is_missing() {
        let registration =
            PushRegistration { platform: Platform::Fcm, address: "t".into(), keys: None, endpoint: None };
        let e = Unwired.release(&registration).await.unwrap_err();
        assert!(e.to_string().contains("wakeups port is not wired"), "{e}");
        assert!(!Unwired.serves(Platform::WebPush));
        let e = Unwired.post(&ConnectionId::try_from("c").unwrap(), "{}").await.unwrap_err();
        assert!(e.to_string().contains("push port"), "{e}");
    }
}
