//! The presigned blob URLs: `PUT /blobs/{id}` uploads, `GET /blobs/{id}` downloads.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use courier_core::Courier;
use courier_core::ids::AttachmentId;
use courier_core::ports::{Attachment, Clock, SystemClock};
use courier_embedded::{FileBlobs, UploadError};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncReadExt;

#[derive(Clone)]
pub struct BlobState {
    pub courier: Arc<Courier>,
    pub files: FileBlobs,
}

#[derive(Deserialize)]
pub struct Signed {
    expires: Option<i64>,
    sig: Option<String>,
}

fn refuse(e: UploadError) -> Response {
    let status = match e {
        UploadError::Forbidden => StatusCode::FORBIDDEN,
        UploadError::BadRequest(_) => StatusCode::BAD_REQUEST,
        UploadError::NotFound => StatusCode::NOT_FOUND,
        UploadError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, format!("{e}\n")).into_response()
}

/// Checks the URL and finds the attachment it names.
async fn signed_attachment(
    state: &BlobState,
    method: &str,
    id: &str,
    signed: &Signed,
) -> Result<Attachment, UploadError> {
    // A URL without its signature is refused as a wrong one is, as S3 does.
    let (Some(expires), Some(sig)) = (signed.expires, signed.sig.as_deref()) else {
        return Err(UploadError::Forbidden);
    };
    state.files.check(method, id, expires, sig, SystemClock.now())?;
    let id = AttachmentId::try_from(id).map_err(|_| UploadError::NotFound)?;
    match state.courier.ports().attachments.attachment(&id).await {
        Ok(Some(attachment)) => Ok(attachment),
        Ok(None) => Err(UploadError::NotFound),
        Err(_) => Err(UploadError::Internal),
    }
}

pub async fn upload(
    State(state): State<BlobState>,
    Path(id): Path<String>,
    Query(signed): Query<Signed>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let attachment = signed_attachment(&state, "PUT", &id, &signed).await?;
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        if header("content-type") != Some(attachment.content_type.as_str()) {
            return Err(UploadError::BadRequest(format!(
                "the content-type header must be {}",
                attachment.content_type
            )));
        }
        let length = header("content-length").and_then(|v| v.parse().ok());
        let mut upload =
            state.files.begin_upload(&attachment, header(courier_embedded::CHECKSUM_HEADER), length).await?;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk: Bytes = match chunk {
                Ok(chunk) => chunk,
                Err(_) => {
                    upload.abandon().await;
                    return Err(UploadError::BadRequest("the upload was cut short".into()));
                }
            };
            upload.write(&chunk).await?;
        }
        upload.finish().await
    };
    match result.await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => refuse(e),
    }
}

pub async fn download(
    State(state): State<BlobState>,
    Path(id): Path<String>,
    Query(signed): Query<Signed>,
) -> Response {
    let result = async {
        let attachment = signed_attachment(&state, "GET", &id, &signed).await?;
        let path = state.files.download_path(&attachment)?;
        let file = tokio::fs::File::open(path).await.map_err(|_| UploadError::NotFound)?;
        Ok::<_, UploadError>((attachment, file))
    };
    let (attachment, file) = match result.await {
        Ok(found) => found,
        Err(e) => return refuse(e),
    };
    let chunks = futures_util::stream::unfold(file, |mut file| async move {
        let mut buf = vec![0u8; 64 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    // The bytes are whatever a user uploaded, served from the API's own
    // origin: a browser must save them, never render them (an uploaded
    // text/html would run as this origin's page) nor guess another type.
    (
        [
            (header::CONTENT_TYPE, attachment.content_type),
            (header::CONTENT_LENGTH, attachment.size.to_string()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
            (header::CONTENT_DISPOSITION, "attachment".to_owned()),
        ],
        Body::from_stream(chunks),
    )
        .into_response()
}
