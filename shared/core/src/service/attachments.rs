//! Media: createAttachment and getAttachment, through presigned URLs.

use tracing::instrument;

use super::Courier;
use crate::domain::Caller;
use crate::error::{Error, Result};
use crate::ids::AttachmentId;
use crate::ports::{Attachment, Quota};
use crate::protocol::{AttachmentCreated, AttachmentLink, CreateAttachment};

fn valid_content_type(s: &str) -> bool {
    let Some((kind, sub)) = s.split_once('/') else {
        return false;
    };
    let token =
        |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b));
    s.len() <= 127 && token(kind) && token(sub)
}

impl Courier {
    #[instrument(level = "debug", skip_all, fields(user = %caller.user, size = cmd.size))]
    pub async fn create_attachment(
        &self,
        caller: &Caller,
        cmd: CreateAttachment,
    ) -> Result<AttachmentCreated> {
        if !valid_content_type(&cmd.content_type) {
            return Err(Error::BadRequest("contentType must be a MIME type such as image/jpeg".into()));
        }
        if cmd.size == 0 {
            return Err(Error::BadRequest("size must be at least 1 byte".into()));
        }
        if cmd.size > self.limits.max_attachment_bytes {
            return Err(Error::LimitExceeded(format!(
                "an attachment is at most {} bytes",
                self.limits.max_attachment_bytes
            )));
        }
        if cmd.sha256.len() != 64 || !cmd.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::BadRequest("sha256 must be 64 hex characters".into()));
        }
        self.charge(&caller.user, Quota::AttachmentBytes, cmd.size).await?;
        let now = self.now();
        let attachment = Attachment {
            id: self.ids.attachment(now),
            uploader: caller.user.clone(),
            content_type: cmd.content_type,
            size: cmd.size,
            sha256: cmd.sha256.to_ascii_lowercase(),
            created_at: now,
        };
        self.ports.attachments.put_attachment(&attachment).await?;
        let upload = self.ports.blobs.presign_upload(&attachment, now + self.limits.url_ttl_ms).await?;
        Ok(AttachmentCreated {
            attachment_id: attachment.id,
            upload_url: upload.url,
            upload_headers: upload.headers,
            expires_at: upload.expires_at,
        })
    }

    #[instrument(level = "debug", skip_all, fields(user = %caller.user, attachment = %id))]
    pub async fn get_attachment(&self, caller: &Caller, id: &AttachmentId) -> Result<AttachmentLink> {
        let not_found = || Error::NotFound("no such attachment".into());
        let attachment = self.ports.attachments.attachment(id).await?.ok_or_else(not_found)?;
        if attachment.uploader != caller.user && !self.shares_a_chat_with(caller, &attachment).await? {
            return Err(Error::Forbidden("this attachment was not shared in any of your chats".into()));
        }
        if !self.ports.blobs.uploaded(&attachment).await? {
            return Err(Error::NotFound("the attachment has not been uploaded yet".into()));
        }
        let link =
            self.ports.blobs.presign_download(&attachment, self.now() + self.limits.url_ttl_ms).await?;
        Ok(AttachmentLink {
            attachment_id: attachment.id,
            download_url: link.url,
            content_type: attachment.content_type,
            size: attachment.size,
            sha256: attachment.sha256,
            expires_at: link.expires_at,
        })
    }

    async fn shares_a_chat_with(&self, caller: &Caller, attachment: &Attachment) -> Result<bool> {
        for chat in self.ports.attachments.chats_of_attachment(&attachment.id).await? {
            if let Some(chat) = self.ports.chats.chat(&chat).await?
                && chat.is_member(&caller.user)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Checks that every attachment of a message was uploaded, completely, by its sender.
    pub(super) async fn check_attachments(&self, caller: &Caller, ids: &[AttachmentId]) -> Result<()> {
        for id in ids {
            let attachment = self.ports.attachments.attachment(id).await?;
            let usable = match &attachment {
                Some(a) if a.uploader == caller.user => self.ports.blobs.uploaded(a).await?,
                _ => false,
            };
            if !usable {
                return Err(Error::BadRequest(
                    "an attachment is not an upload of yours that has completed".into(),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn content_types_are_mime_shaped() {
        assert!(super::valid_content_type("image/jpeg"));
        assert!(super::valid_content_type("video/mp4"));
        assert!(!super::valid_content_type("jpeg"));
        assert!(!super::valid_content_type("image/"));
        assert!(!super::valid_content_type("image/jp eg"));
    }
}
