//! Criterion benchmarks of the NBD frontend's per-request wire work
//! (`strata_controller::frontend::nbd::proto`): parsing and encoding the
//! 28-byte request header, and encoding the simple and structured reply
//! headers. Run: `cargo bench --bench nbd` (about 15 s).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use strata_controller::frontend::nbd::proto::{
    encode_request, encode_simple_reply, encode_structured_header, parse_request, Cmd, Request,
    NBD_REPLY_FLAG_DONE as REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA as REPLY_TYPE_OFFSET_DATA,
    REQUEST_HEADER_LEN,
};

fn request() -> Request {
    Request {
        flags: 0,
        cmd: Cmd::Write,
        handle: 0x1234_5678_9abc_def0,
        offset: 1 << 30,
        len: 4096,
    }
}

fn request_header(c: &mut Criterion) {
    let mut g = c.benchmark_group("nbd_request_header");
    g.throughput(Throughput::Bytes(REQUEST_HEADER_LEN as u64));
    let req = request();
    let mut bytes = Vec::with_capacity(REQUEST_HEADER_LEN);
    encode_request(&mut bytes, &req);
    g.bench_function("parse", |b| {
        b.iter(|| parse_request(black_box(&bytes[..])).unwrap())
    });
    let mut out = Vec::with_capacity(64);
    g.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            encode_request(&mut out, black_box(&req));
            out.len()
        })
    });
    g.finish();
}

fn reply_header(c: &mut Criterion) {
    let mut g = c.benchmark_group("nbd_reply_header");
    let mut out = Vec::with_capacity(64);
    g.bench_function("simple", |b| {
        b.iter(|| {
            out.clear();
            encode_simple_reply(&mut out, black_box(0x1234_5678_9abc_def0), black_box(0));
            out.len()
        })
    });
    g.bench_function("structured_offset_data", |b| {
        b.iter(|| {
            out.clear();
            encode_structured_header(
                &mut out,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                black_box(0x1234_5678_9abc_def0),
                black_box(4096 + 8),
            );
            out.len()
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = request_header, reply_header
}
criterion_main!(benches);
