//! Criterion benchmarks of the NBD frontend's per-request wire work
//! (`strata_controller::frontend::nbd::proto`): parsing and encoding the
//! 28-byte request header, and encoding the simple and structured reply
//! headers. Run: `cargo bench --bench nbd` (about 15 s).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use strata_controller::frontend::nbd::proto::{
    encode_request, parse_request, simple_reply_header, structured_header, Cmd, Request,
    REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, REQUEST_HEADER_LEN,
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
    let bytes = encode_request(&req);
    g.bench_function("parse", |b| {
        b.iter(|| parse_request(black_box(&bytes[..])).unwrap())
    });
    g.bench_function("encode", |b| b.iter(|| encode_request(black_box(&req))));
    g.finish();
}

fn reply_header(c: &mut Criterion) {
    let mut g = c.benchmark_group("nbd_reply_header");
    g.bench_function("simple", |b| {
        b.iter(|| simple_reply_header(black_box(0x1234_5678_9abc_def0), black_box(0)))
    });
    g.bench_function("structured_offset_data", |b| {
        b.iter(|| {
            structured_header(
                black_box(0x1234_5678_9abc_def0),
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                black_box(4096 + 8),
            )
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
