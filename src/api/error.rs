//! The one place errors become HTTP: status from the error's kind, JSON body
//! `{code, message, recoverable}`, `Retry-After` on back-pressure.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::error::{Error, Kind};
pub use crate::wire::ErrorBody;

pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        ApiError(e)
    }
}

pub fn status_of(kind: Kind) -> StatusCode {
    match kind {
        Kind::InvalidInput => StatusCode::BAD_REQUEST,
        Kind::Unauthorized => StatusCode::UNAUTHORIZED,
        Kind::Forbidden => StatusCode::FORBIDDEN,
        Kind::NotFound => StatusCode::NOT_FOUND,
        Kind::Conflict => StatusCode::CONFLICT,
        Kind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Kind::UnsupportedMedia => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Kind::Busy => StatusCode::TOO_MANY_REQUESTS,
        Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Kind::Corrupt | Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = status_of(e.kind());
        match e.kind() {
            Kind::Corrupt | Kind::Internal | Kind::Unavailable => {
                tracing::error!(code = e.code(), error = %e, "request failed")
            }
            _ => tracing::debug!(code = e.code(), error = %e, "request refused"),
        }
        let body = ErrorBody {
            code: e.code().to_string(),
            message: e.to_string(),
            recoverable: e.recoverable(),
            owner_url: match &e {
                Error::LeaseHeld { owner_url, .. } => Some(owner_url.clone()),
                _ => None,
            },
        };
        let mut resp = (status, axum::Json(body)).into_response();
        let retry = match &e {
            Error::Busy { retry_after_s, .. } => Some(*retry_after_s),
            _ if e.kind() == Kind::Unavailable => Some(5),
            _ => None,
        };
        if let Some(s) = retry {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
