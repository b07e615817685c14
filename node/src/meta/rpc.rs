//! The metadata RPC on libp2p streams: one framed request, one framed
//! response (spec/metadata.md, "Metadata RPC"). The server side answers
//! from the local replica; a request that breaks the protocol gets an error
//! answer with the reason, and the stream is closed.

use cairn_protocol::meta::RowValue;
use cairn_protocol::metarpc::{self, Call, ErrorCode, MAX_ITEMS, Request, Response};
use futures::{AsyncReadExt, AsyncWriteExt};
use thiserror::Error;

use super::Metadata;
use super::replica::{ReplicaError, UNFENCED};

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
pub async fn call(mut stream: libp2p::Stream, call: &Call) -> Result<Response, RpcError> {
    write_frame(&mut stream, &call.encode()).await?;
    let body = read_frame(&mut stream).await?;
    let _ = stream.close().await;
    Ok(Response::decode(&body)?)
}

/// Serves one request from a peer.
pub async fn serve(mut stream: libp2p::Stream, metadata: &Metadata) -> Result<(), RpcError> {
    let body = read_frame(&mut stream).await?;
    let response = match Call::decode(&body) {
        Ok(call) => answer(metadata, call).await,
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
/// and this node's own coordinator. The caller's map version first raises
/// the replica's fence, so that a replica refuses changes from coordinators
/// with an older map; but only to a version of a signed map this node has
/// verified (it waits a little for a newer one to arrive), so that no
/// request can raise it past every real map and stop all writes. The
/// unfenced sentinel is never taken from a request.
pub async fn answer(metadata: &Metadata, call: Call) -> Response {
    if call.map_version == UNFENCED {
        return Response::error(
            ErrorCode::Malformed,
            format!("map version {UNFENCED} names no map"),
        );
    }
    if let Err(declined) = metadata.verified_map(call.map_version).await {
        return Response::error(ErrorCode::Declined, declined);
    }
    // A node the map leaves out (or has out) holds no replica the cluster
    // counts on; what it holds may predate compacted tombstones.
    if let Err(declined) = metadata.serves_as_replica() {
        return Response::error(ErrorCode::Declined, declined);
    }
    let replica = metadata.replica();
    if let Err(error) = replica.raise_fence(call.map_version).await {
        tracing::error!(%error, "metadata replica could not raise its fence");
        return Response::error(ErrorCode::Internal, error.to_string());
    }
    match try_answer(metadata, call.map_version, call.request).await {
        Ok(response) => response,
        Err(error) => {
            tracing::error!(%error, "metadata replica failed a request");
            Response::error(ErrorCode::Internal, error.to_string())
        }
    }
}

async fn try_answer(
    metadata: &Metadata,
    map_version: u64,
    request: Request,
) -> Result<Response, ReplicaError> {
    let replica = metadata.replica();
    let limit = |limit: u32| (limit as usize).min(MAX_ITEMS);
    Ok(match request {
        Request::Write { rows } => {
            for (key, value) in &rows {
                if let Err(error) = value.check_fits(key) {
                    return Ok(Response::error(ErrorCode::Refused, error.to_string()));
                }
                if let Err(declined) = metadata.check_incoming(value) {
                    return Ok(Response::error(ErrorCode::Declined, declined));
                }
            }
            replica.merge(rows, map_version).await?
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
        Request::Filled {
            partition,
            version,
            old,
        } => match metadata.ensure_filled(partition, version, old).await {
            Ok(filled) => Response::Filled { filled },
            Err(error) => Response::error(ErrorCode::Internal, error.to_string()),
        },
        Request::Registers {
            partition,
            after,
            limit: max,
        } => {
            let replica = replica.clone();
            blocking(move || {
                replica
                    .register_names(&partition, after.as_deref(), limit(max))
                    .map(|(names, more)| Response::Registers { names, more })
            })
            .await?
        }
        Request::Prepare { key, ballot } => replica.prepare(key, ballot, map_version).await?,
        Request::Accept { key, ballot, value } => {
            replica.accept(key, ballot, value, map_version).await?
        }
        Request::ReadRegister { key } => {
            // A coordinator with an older map may be asking replicas that
            // no longer hold the partition: refused like a change.
            let fence = replica.fence();
            if map_version < fence {
                return Ok(Response::error(
                    ErrorCode::StaleMap,
                    format!(
                        "your cluster map (version {map_version}) is older than version {fence}, which this replica has seen"
                    ),
                ));
            }
            let replica = replica.clone();
            blocking(move || {
                replica
                    .accepted(&key)
                    .map(|accepted| Response::RegisterState { accepted })
            })
            .await?
        }
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
