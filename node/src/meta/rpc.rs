//! The metadata RPC on libp2p streams: one framed request, one framed
//! response (spec/metadata.md, "Metadata RPC"). The server side answers
//! from the local replica; a request that breaks the protocol gets an error
//! answer with the reason, and the stream is closed.

use cairn_protocol::meta::RowValue;
use cairn_protocol::metarpc::{self, ErrorCode, MAX_ITEMS, Request, Response};
use futures::{AsyncReadExt, AsyncWriteExt};
use thiserror::Error;

use super::replica::{MetaReplica, ReplicaError};

#[derive(Debug, Error)]
pub enum RpcError {
    #[error("metadata stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed metadata message: {0}")]
    Malformed(#[from] cairn_protocol::DecodeError),
}

async fn read_frame(stream: &mut libp2p::Stream) -> Result<Vec<u8>, RpcError> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let len = metarpc::frame_len(header)?;
    // Grows as bytes arrive: a declared length alone allocates nothing.
    let mut body = Vec::new();
    (&mut *stream)
        .take(len as u64)
        .read_to_end(&mut body)
        .await?;
    if body.len() != len {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok(body)
}

async fn write_frame(stream: &mut libp2p::Stream, body: &[u8]) -> Result<(), RpcError> {
    stream.write_all(&metarpc::frame(body)).await?;
    stream.flush().await?;
    Ok(())
}

/// Sends one request and reads its answer.
pub async fn call(mut stream: libp2p::Stream, request: &Request) -> Result<Response, RpcError> {
    write_frame(&mut stream, &request.encode()).await?;
    let body = read_frame(&mut stream).await?;
    let _ = stream.close().await;
    Ok(Response::decode(&body)?)
}

/// Serves one request from a peer.
pub async fn serve(mut stream: libp2p::Stream, replica: &MetaReplica) -> Result<(), RpcError> {
    let body = read_frame(&mut stream).await?;
    let response = match Request::decode(&body) {
        Ok(request) => answer(replica, request).await,
        Err(error) => {
            let response = Response::error(ErrorCode::Malformed, error.to_string());
            write_frame(&mut stream, &response.encode()).await?;
            let _ = stream.close().await;
            return Err(error.into());
        }
    };
    write_frame(&mut stream, &response.encode()).await?;
    let _ = stream.close().await;
    Ok(())
}

/// Answers a request from the local replica: the same path serves peers
/// and this node's own coordinator.
pub async fn answer(replica: &MetaReplica, request: Request) -> Response {
    match try_answer(replica, request).await {
        Ok(response) => response,
        Err(error) => {
            tracing::error!(%error, "metadata replica failed a request");
            Response::error(ErrorCode::Internal, error.to_string())
        }
    }
}

async fn try_answer(replica: &MetaReplica, request: Request) -> Result<Response, ReplicaError> {
    let limit = |limit: u32| (limit as usize).min(MAX_ITEMS);
    Ok(match request {
        Request::Write { rows } => {
            for (key, value) in &rows {
                if let Err(error) = value.check_fits(key) {
                    return Ok(Response::error(ErrorCode::Refused, error.to_string()));
                }
            }
            replica.merge(rows).await?;
            Response::Written
        }
        Request::Read { keys } => {
            let replica = replica.clone();
            blocking(move || replica.get(&keys).map(Response::Rows)).await?
        }
        Request::Range {
            partition,
            table,
            start,
            end,
            limit: max,
        } => {
            let replica = replica.clone();
            blocking(move || {
                replica
                    .range(&partition, table, &start, end.as_deref(), limit(max))
                    .map(|page| Response::Page {
                        rows: page.rows,
                        more: page.more,
                    })
            })
            .await?
        }
        Request::Partitions { after, limit: max } => {
            let replica = replica.clone();
            blocking(move || {
                replica
                    .partitions(after.as_ref(), limit(max))
                    .map(|(items, more)| Response::Partitions { items, more })
            })
            .await?
        }
        Request::Digest { partition } => {
            let replica = replica.clone();
            blocking(move || replica.digest(&partition).map(Response::Digest)).await?
        }
        Request::LeafRows {
            partition,
            leaves,
            after,
            limit: max,
        } => {
            let replica = replica.clone();
            blocking(move || {
                replica
                    .leaf_rows(
                        &partition,
                        &leaves,
                        after.as_ref().map(|(t, s)| (*t, s.as_slice())),
                        limit(max),
                    )
                    .map(|(items, more)| Response::LeafRows { items, more })
            })
            .await?
        }
        Request::Prepare { key, ballot } => replica.prepare(key, ballot).await?,
        Request::Accept { key, ballot, value } => replica.accept(key, ballot, value).await?,
    })
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ReplicaError> + Send + 'static,
) -> Result<T, ReplicaError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ReplicaError::Database(e.to_string()))?
}

/// A value's merge with another, or the first if they cannot merge (a
/// replica answering with a value of the wrong kind is ignored, and logged).
pub fn merge_answers(a: RowValue, b: &RowValue) -> RowValue {
    match a.merge(b) {
        Ok(merged) => merged,
        Err(error) => {
            tracing::warn!(%error, "replicas disagree on a row's kind; keeping the first");
            a
        }
    }
}
