//! Encoders of the NBD wire format: server messages (greeting, option
//! replies, simple and structured replies) and, for tests and fuzzing, the
//! client's (options, requests). Each appends to a `Vec<u8>`; read data is
//! never copied in (the server writes a header, then the data).

use super::*;

/// The server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(out: &mut Vec<u8>, flags: u16) {
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
}

/// An option request (the client side; used by tests and fuzzing).
pub fn encode_option(out: &mut Vec<u8>, code: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The payload of an `NBD_OPT_INFO` / `NBD_OPT_GO` request.
pub fn encode_info_request(out: &mut Vec<u8>, req: &InfoRequest) {
    out.extend_from_slice(&(req.name.len() as u32).to_be_bytes());
    out.extend_from_slice(req.name.as_bytes());
    out.extend_from_slice(&(req.infos.len() as u16).to_be_bytes());
    for i in &req.infos {
        out.extend_from_slice(&i.to_be_bytes());
    }
}

/// The payload of a `LIST_META_CONTEXT` / `SET_META_CONTEXT` request.
pub fn encode_meta_request(out: &mut Vec<u8>, req: &MetaContextRequest) {
    out.extend_from_slice(&(req.export.len() as u32).to_be_bytes());
    out.extend_from_slice(req.export.as_bytes());
    out.extend_from_slice(&(req.queries.len() as u32).to_be_bytes());
    for q in &req.queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
}

/// One option reply with `data` as its payload.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// `NBD_REP_SERVER` naming one export.
pub fn encode_rep_server(out: &mut Vec<u8>, option: u32, name: &str) {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    encode_option_reply(out, option, NBD_REP_SERVER, &data);
}

/// `NBD_REP_INFO` / `NBD_INFO_EXPORT`: size and transmission flags.
pub fn encode_info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    let mut data = Vec::with_capacity(12);
    data.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
    data.extend_from_slice(&size.to_be_bytes());
    data.extend_from_slice(&flags.to_be_bytes());
    encode_option_reply(out, option, NBD_REP_INFO, &data);
}

/// `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(out: &mut Vec<u8>, option: u32, min: u32, preferred: u32, max: u32) {
    let mut data = Vec::with_capacity(14);
    data.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    data.extend_from_slice(&min.to_be_bytes());
    data.extend_from_slice(&preferred.to_be_bytes());
    data.extend_from_slice(&max.to_be_bytes());
    encode_option_reply(out, option, NBD_REP_INFO, &data);
}

/// `NBD_REP_INFO` / `NBD_INFO_NAME`.
pub fn encode_info_name(out: &mut Vec<u8>, option: u32, name: &str) {
    let mut data = Vec::with_capacity(2 + name.len());
    data.extend_from_slice(&NBD_INFO_NAME.to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    encode_option_reply(out, option, NBD_REP_INFO, &data);
}

/// `NBD_REP_META_CONTEXT`: a context id and its name.
pub fn encode_rep_meta_context(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&id.to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    encode_option_reply(out, option, NBD_REP_META_CONTEXT, &data);
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and 124
/// zero bytes unless the client asked for `NO_ZEROES`.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// A request header (the client side; used by tests and fuzzing).
pub fn encode_request(out: &mut Vec<u8>, req: &Request) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&req.flags.to_be_bytes());
    out.extend_from_slice(&req.cmd.to_u16().to_be_bytes());
    out.extend_from_slice(&req.handle.to_be_bytes());
    out.extend_from_slice(&req.offset.to_be_bytes());
    out.extend_from_slice(&req.len.to_be_bytes());
}

/// A simple reply header; for a successful READ the data follows it.
pub fn encode_simple_reply(out: &mut Vec<u8>, handle: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
}

/// A structured reply chunk header announcing `len` payload bytes.
pub fn encode_structured_header(out: &mut Vec<u8>, flags: u16, kind: u16, handle: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// The header and offset of an `OFFSET_DATA` chunk; `data_len` bytes of
/// data follow it on the wire (written by the caller, not copied here).
pub fn encode_offset_data_header(
    out: &mut Vec<u8>,
    handle: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) {
    let flags = if done { NBD_REPLY_FLAG_DONE } else { 0 };
    let len = data_len.saturating_add(8);
    encode_structured_header(out, flags, NBD_REPLY_TYPE_OFFSET_DATA, handle, len);
    out.extend_from_slice(&offset.to_be_bytes());
}

/// A `NONE` chunk with the `DONE` flag: the end of a structured reply.
pub fn encode_structured_done(out: &mut Vec<u8>, handle: u64) {
    encode_structured_header(out, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, handle, 0);
}

/// An `ERROR` chunk (final) with a human-readable message, cut to fit.
pub fn encode_structured_error(out: &mut Vec<u8>, handle: u64, error: u32, message: &str) {
    let mut msg = &message.as_bytes()[..message.len().min(MAX_STRING_LEN)];
    while std::str::from_utf8(msg).is_err() {
        msg = &msg[..msg.len() - 1];
    }
    let len = 6 + msg.len() as u32;
    encode_structured_header(out, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, handle, len);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// A `BLOCK_STATUS` chunk (final) for context `context_id`.
pub fn encode_block_status(
    out: &mut Vec<u8>,
    handle: u64,
    context_id: u32,
    extents: &[BlockDescriptor],
) {
    let len = 4 + 8 * extents.len() as u32;
    encode_structured_header(
        out,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_BLOCK_STATUS,
        handle,
        len,
    );
    out.extend_from_slice(&context_id.to_be_bytes());
    for e in extents {
        out.extend_from_slice(&e.len.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
    }
}
