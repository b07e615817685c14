//! A bound on aws-chunked framing (spec/gateway.md, "Request checks").
//! s3s 0.14 buffers each signed chunk whole before checking its
//! signature, with no bound on the size a chunk header declares; this body
//! wrapper follows the framing as the bytes pass, unchanged, and ends the
//! body with an error as soon as a chunk declares more than
//! [`MAX_CHUNK_BYTES`] or a chunk header runs on.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

pub use cairn_protocol::chunked::{ChunkFraming, FramingError, MAX_CHUNK_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error(transparent)]
    Framing(#[from] FramingError),
    #[error("{0}")]
    Body(String),
}

/// Whether a request's body is aws-chunked.
pub fn is_aws_chunked(headers: &http::HeaderMap) -> bool {
    headers
        .get("x-amz-content-sha256")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("STREAMING-"))
}

/// A request body checked against [`ChunkFraming`] as it streams.
pub struct ChunkGuard<B> {
    inner: B,
    framing: ChunkFraming,
    failed: bool,
}

impl<B> ChunkGuard<B> {
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            framing: ChunkFraming::default(),
            failed: false,
        }
    }
}

impl<B> Body for ChunkGuard<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = ChunkError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ChunkError>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(error) = self.framing.feed(data)
                {
                    self.failed = true;
                    tracing::debug!(%error, "aws-chunked body refused");
                    return Poll::Ready(Some(Err(error.into())));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                Poll::Ready(Some(Err(ChunkError::Body(error.to_string()))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
