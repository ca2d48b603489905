//! `FileBlobs`: attachments as files under the data dir, behind expiring HMAC-signed URLs.
//!
//! The local server serves the URLs (`PUT` and `GET /blobs/{id}`) and drives
//! an [`Upload`] with the request body; the upload is hashed as it streams
//! and lands under its final name only when its size and SHA-256 match what
//! createAttachment declared, as S3 checks `x-amz-checksum-sha256`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use courier_core::domain::Millis;
use courier_core::error::{Error, Result};
use courier_core::ports::{Attachment, Blobs, Presigned};

pub const CHECKSUM_HEADER: &str = "x-amz-checksum-sha256";

#[derive(Clone)]
pub struct FileBlobs {
    dir: PathBuf,
    base_url: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for FileBlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileBlobs").field("dir", &self.dir).field("base_url", &self.base_url).finish()
    }
}

/// Why an upload or download was refused; the local server maps these to HTTP statuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UploadError {
    #[error("the URL's signature is wrong or it has expired")]
    Forbidden,
    #[error("{0}")]
    BadRequest(String),
    #[error("no such object")]
    NotFound,
    #[error("storage failed")]
    Internal,
}

impl FileBlobs {
    /// Keeps blobs in `dir`, signing URLs under `base_url` with a key kept in
    /// the same folder, so URLs stay valid across restarts.
    pub fn open(dir: &Path, base_url: &str) -> Result<Self> {
        std::fs::create_dir_all(dir.join("tmp")).map_err(Error::internal)?;
        let key_path = dir.join("url-signing.key");
        let key = match std::fs::read(&key_path) {
            Ok(key) if key.len() >= 32 => key,
            _ => {
                let key: [u8; 32] = rand::random();
                std::fs::write(&key_path, key).map_err(Error::internal)?;
                key.to_vec()
            }
        };
        Ok(Self { dir: dir.to_owned(), base_url: base_url.trim_end_matches('/').to_owned(), key })
    }

    fn path(&self, attachment: &Attachment) -> PathBuf {
        self.dir.join(attachment.id.as_str())
    }

    fn signature(&self, method: &str, id: &str, expires_at: Millis) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(format!("{method}\n{id}\n{expires_at}").as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    fn url(&self, method: &str, attachment: &Attachment, expires_at: Millis) -> String {
        let sig = self.signature(method, attachment.id.as_str(), expires_at);
        format!("{}/blobs/{}?expires={expires_at}&sig={sig}", self.base_url, attachment.id)
    }

    /// Checks a URL's signature and expiry for `method` ("PUT" or "GET").
    pub fn check(
        &self,
        method: &str,
        id: &str,
        expires_at: Millis,
        sig: &str,
        now: Millis,
    ) -> Result<(), UploadError> {
        let Ok(given) = hex::decode(sig) else {
            return Err(UploadError::Forbidden);
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(format!("{method}\n{id}\n{expires_at}").as_bytes());
        if mac.verify_slice(&given).is_err() || now > expires_at {
            return Err(UploadError::Forbidden);
        }
        Ok(())
    }

    /// Starts an upload of `attachment`, given the request's checksum header
    /// and declared length. The bytes go to a temporary file until `finish`.
    pub async fn begin_upload(
        &self,
        attachment: &Attachment,
        checksum_header: Option<&str>,
        content_length: Option<u64>,
    ) -> Result<Upload, UploadError> {
        let declared = hex::decode(&attachment.sha256).map_err(|_| UploadError::Internal)?;
        if checksum_header != Some(B64.encode(&declared).as_str()) {
            return Err(UploadError::BadRequest(format!(
                "the {CHECKSUM_HEADER} header must be the base64 SHA-256 declared at createAttachment"
            )));
        }
        if let Some(len) = content_length
            && len != attachment.size
        {
            return Err(UploadError::BadRequest(format!(
                "the body must be exactly {} bytes",
                attachment.size
            )));
        }
        let temp = self.dir.join("tmp").join(format!("{}.{}", attachment.id, rand::random::<u64>()));
        let file = tokio::fs::File::create(&temp).await.map_err(|_| UploadError::Internal)?;
        Ok(Upload {
            file,
            temp,
            target: self.path(attachment),
            hasher: Sha256::new(),
            written: 0,
            size: attachment.size,
            declared,
        })
    }

    /// The file of an uploaded attachment, if the GET URL is valid.
    pub fn download_path(&self, attachment: &Attachment) -> Result<PathBuf, UploadError> {
        let path = self.path(attachment);
        if path.is_file() { Ok(path) } else { Err(UploadError::NotFound) }
    }

    /// Deletes blobs older than `before` (S3's lifecycle rule does this when deployed).
    pub fn expire(&self, before: std::time::SystemTime) -> Result<u64> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.dir).map_err(Error::internal)?.flatten() {
            let meta = entry.metadata().map_err(Error::internal)?;
            if meta.is_file()
                && entry.file_name() != "url-signing.key"
                && meta.modified().is_ok_and(|m| m < before)
                && std::fs::remove_file(entry.path()).is_ok()
            {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// An upload in progress: bytes are hashed and counted as they are written.
pub struct Upload {
    file: tokio::fs::File,
    temp: PathBuf,
    target: PathBuf,
    hasher: Sha256,
    written: u64,
    size: u64,
    declared: Vec<u8>,
}

impl Upload {
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), UploadError> {
        self.written += chunk.len() as u64;
        if self.written > self.size {
            self.abandon().await;
            return Err(UploadError::BadRequest(format!(
                "the body is longer than the declared {} bytes",
                self.size
            )));
        }
        self.hasher.update(chunk);
        self.file.write_all(chunk).await.map_err(|_| UploadError::Internal)
    }

    /// Checks size and hash, then moves the file into place.
    pub async fn finish(mut self) -> Result<(), UploadError> {
        if self.written != self.size {
            self.abandon().await;
            return Err(UploadError::BadRequest(format!(
                "the body is {} bytes, not the declared {}",
                self.written, self.size
            )));
        }
        if self.hasher.clone().finalize().as_slice() != self.declared.as_slice() {
            self.abandon().await;
            return Err(UploadError::BadRequest("the body's SHA-256 differs from the declared one".into()));
        }
        self.file.sync_all().await.map_err(|_| UploadError::Internal)?;
        tokio::fs::rename(&self.temp, &self.target).await.map_err(|_| UploadError::Internal)
    }

    pub async fn abandon(&mut self) {
        let _ = tokio::fs::remove_file(&self.temp).await;
    }
}

#[async_trait]
impl Blobs for FileBlobs {
    async fn presign_upload(&self, attachment: &Attachment, expires_at: Millis) -> Result<Presigned> {
        let digest = hex::decode(&attachment.sha256).map_err(Error::internal)?;
        let headers = BTreeMap::from([
            ("content-type".to_owned(), attachment.content_type.clone()),
            (CHECKSUM_HEADER.to_owned(), B64.encode(digest)),
        ]);
        Ok(Presigned { url: self.url("PUT", attachment, expires_at), headers, expires_at })
    }

    async fn presign_download(&self, attachment: &Attachment, expires_at: Millis) -> Result<Presigned> {
        Ok(Presigned { url: self.url("GET", attachment, expires_at), headers: BTreeMap::new(), expires_at })
    }

    async fn uploaded(&self, attachment: &Attachment) -> Result<bool> {
        Ok(tokio::fs::try_exists(self.path(attachment)).await.unwrap_or(false))
    }

    async fn delete(&self, attachment: &Attachment) -> Result<()> {
        match tokio::fs::remove_file(self.path(attachment)).await {
            Ok(()) => Ok(()),
            // Never uploaded, or already gone (a retried deleteAccount, the expiry sweep).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::internal(e)),
        }
    }
}
