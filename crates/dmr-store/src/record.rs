//! Encoding of the values of the `messages` and `queues` tables.

use std::path::Path;

use bytes::Bytes;

use crate::{Headers, QueueArgs, StoreError};

const VERSION: u8 = 1;
const FLAG_REDELIVERED: u8 = 1;
/// version (1) + enqueued_at_ms (8) + flags (1) + headers length (4)
const FIXED: usize = 14;

/// The fixed part of a message record: what the in-memory index keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub enqueued_at_ms: u64,
    pub redelivered: bool,
}

/// Encodes a message record: `[1u8 version][enqueued_at_ms u64 LE][flags u8][headers_len u32 LE][headers JSON][body]`.
pub(crate) fn encode(meta: Meta, headers: &Headers, body: &[u8], path: &Path) -> Result<Vec<u8>, StoreError> {
    let h = serde_json::to_vec(headers).map_err(|e| StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: format!("headers do not serialize: {e}"),
    })?;
    let hlen = u32::try_from(h.len()).map_err(|_| StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: "headers larger than 4 GiB".into(),
    })?;
    let mut out = Vec::with_capacity(FIXED + h.len() + body.len());
    out.push(VERSION);
    out.extend_from_slice(&meta.enqueued_at_ms.to_le_bytes());
    out.push(if meta.redelivered { FLAG_REDELIVERED } else { 0 });
    out.extend_from_slice(&hlen.to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(body);
    Ok(out)
}

fn corrupt(path: &Path, detail: &str) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

/// Decodes only the fixed part (used when rebuilding the index at open).
pub(crate) fn decode_meta(raw: &[u8], path: &Path) -> Result<Meta, StoreError> {
    if raw.len() < FIXED || raw[0] != VERSION {
        return Err(corrupt(path, "message record too short or of unknown version"));
    }
    let mut at = [0u8; 8];
    at.copy_from_slice(&raw[1..9]);
    Ok(Meta {
        enqueued_at_ms: u64::from_le_bytes(at),
        redelivered: raw[9] & FLAG_REDELIVERED != 0,
    })
}

/// Decodes a whole record.
pub(crate) fn decode(raw: &[u8], path: &Path) -> Result<(Meta, Headers, Bytes), StoreError> {
    let meta = decode_meta(raw, path)?;
    let mut hl = [0u8; 4];
    hl.copy_from_slice(&raw[10..14]);
    let hlen = u32::from_le_bytes(hl) as usize;
    let end = FIXED
        .checked_add(hlen)
        .filter(|e| *e <= raw.len())
        .ok_or_else(|| corrupt(path, "message headers overrun the record"))?;
    let headers: Headers =
        serde_json::from_slice(&raw[FIXED..end]).map_err(|e| corrupt(path, &format!("message headers: {e}")))?;
    Ok((meta, headers, Bytes::copy_from_slice(&raw[end..])))
}

/// Encodes queue arguments (JSON).
pub(crate) fn encode_args(args: &QueueArgs, path: &Path) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(args).map_err(|e| corrupt(path, &format!("queue args: {e}")))
}

/// Decodes queue arguments.
pub(crate) fn decode_args(raw: &[u8], path: &Path) -> Result<QueueArgs, StoreError> {
    serde_json::from_slice(raw).map_err(|e| corrupt(path, &format!("queue args: {e}")))
}
