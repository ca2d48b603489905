//! `S3Blobs`: attachments in S3 behind presigned URLs.
//!
//! The upload URL signs the declared length and `x-amz-checksum-sha256`, so
//! S3 itself refuses a body whose size or hash differs; HeadObject then
//! confirms the upload before a message may carry it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_s3::presigning::PresigningConfig;
use base64::Engine;

use courier_core::domain::Millis;
use courier_core::error::{Error, Result};
use courier_core::ports::{Attachment, Blobs, Presigned};

#[derive(Clone)]
pub struct S3Blobs {
    client: aws_sdk_s3::Client,
    bucket: String,
}

impl S3Blobs {
    pub fn new(client: aws_sdk_s3::Client, bucket: String) -> Self {
        Self { client, bucket }
    }

    fn key(attachment: &Attachment) -> String {
        format!("attachments/{}", attachment.id)
    }

    /// A presigning config valid from now until at least `expires_at`:
    /// SigV4 counts whole seconds, so the URL may outlive it by under one.
    fn presigning(expires_at: Millis) -> Result<PresigningConfig> {
        let start = SystemTime::now().duration_since(UNIX_EPOCH).map_err(Error::internal)?.as_secs();
        let ttl_ms = (expires_at - start as Millis * 1000).max(1000) as u64;
        PresigningConfig::builder()
            .start_time(UNIX_EPOCH + Duration::from_secs(start))
            .expires_in(Duration::from_secs(ttl_ms.div_ceil(1000)))
            .build()
            .map_err(Error::internal)
    }
}

fn checksum(attachment: &Attachment) -> Result<String> {
    let digest = hex::decode(&attachment.sha256).map_err(Error::internal)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(digest))
}

#[async_trait]
impl Blobs for S3Blobs {
    async fn presign_upload(&self, attachment: &Attachment, expires_at: Millis) -> Result<Presigned> {
        let config = Self::presigning(expires_at)?;
        let checksum = checksum(attachment)?;
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(Self::key(attachment))
            .content_type(&attachment.content_type)
            .content_length(attachment.size as i64)
            .checksum_sha256(&checksum)
            .presigned(config)
            .await
            .map_err(super::sdk_error)?;
        // The client must send exactly the signed headers; the length goes as
        // Content-Length, which every HTTP client sets from the body itself.
        let headers: BTreeMap<String, String> = request
            .headers()
            .filter(|(name, _)| !name.eq_ignore_ascii_case("content-length"))
            .map(|(name, value)| (name.to_ascii_lowercase(), value.to_owned()))
            .collect();
        Ok(Presigned { url: request.uri().to_owned(), headers, expires_at })
    }

    async fn presign_download(&self, attachment: &Attachment, expires_at: Millis) -> Result<Presigned> {
        let config = Self::presigning(expires_at)?;
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(Self::key(attachment))
            // Signed into the URL: a browser saves the bytes rather than rendering them.
            .response_content_disposition("attachment")
            .presigned(config)
            .await
            .map_err(super::sdk_error)?;
        Ok(Presigned { url: request.uri().to_owned(), headers: BTreeMap::new(), expires_at })
    }

    async fn uploaded(&self, attachment: &Attachment) -> Result<bool> {
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(Self::key(attachment))
            .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
            .send()
            .await;
        match head {
            Ok(object) => {
                let size_ok = object.content_length() == Some(attachment.size as i64);
                // Where S3 reports the checksum, it must be the declared one.
                let hash_ok =
                    object.checksum_sha256().is_none_or(|c| c == checksum(attachment).unwrap_or_default());
                Ok(size_ok && hash_ok)
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(false),
            Err(e) => Err(super::sdk_error(e)),
        }
    }

    /// DeleteObject answers 204 whether or not the object was there, so a
    /// repeated deletion (a retried deleteAccount) is no error.
    async fn delete(&self, attachment: &Attachment) -> Result<()> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(Self::key(attachment))
            .send()
            .await
            .map_err(super::sdk_error)?;
        Ok(())
    }
}
