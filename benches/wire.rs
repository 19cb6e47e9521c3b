//! Criterion benchmarks of the data wire codec between the controller and a
//! replica (`strata_replica::wire`): encoding and decoding a 4 KiB WRITE
//! request, a READ request, a 4 KiB READ reply and an empty OK reply. Every
//! frame with a payload carries a crc32 that encode computes and decode
//! verifies, so the 4 KiB cases include one crc32 of 4 KiB each.
//! Run: `cargo bench --bench wire` (about 30 s).

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use strata_replica::wire::{Command, Reply, Request, Status};

fn write_request() -> Request {
    Request {
        id: 42,
        epoch: 7,
        command: Command::Write {
            offset: 1 << 30,
            data: Bytes::from(vec![0xa5u8; 4096]),
            fua: false,
        },
    }
}

fn read_request() -> Request {
    Request {
        id: 43,
        epoch: 7,
        command: Command::Read {
            offset: 1 << 30,
            len: 4096,
        },
    }
}

fn read_reply() -> Reply {
    Reply::with_payload(43, 7, Status::Ok, Bytes::from(vec![0x5au8; 4096]))
}

fn encoded_request(r: &Request) -> BytesMut {
    let mut b = BytesMut::new();
    r.encode_into(&mut b);
    b
}

fn encoded_reply(r: &Reply) -> BytesMut {
    let mut b = BytesMut::new();
    r.encode_into(&mut b);
    b
}

fn request_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire_request_encode");
    let mut buf = BytesMut::with_capacity(64 << 10);
    for (name, req) in [("write_4k", write_request()), ("read", read_request())] {
        g.throughput(Throughput::Bytes(encoded_request(&req).len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                buf.clear();
                black_box(&req).encode_into(&mut buf);
                black_box(buf.len())
            })
        });
    }
    g.finish();
}

fn request_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire_request_decode");
    for (name, req) in [("write_4k", write_request()), ("read", read_request())] {
        let frame = encoded_request(&req);
        g.throughput(Throughput::Bytes(frame.len() as u64));
        g.bench_function(format!("{name}/decode_copy"), |b| {
            b.iter(|| Request::decode(black_box(&frame)).unwrap())
        });
        g.bench_function(format!("{name}/decode_from_zero_copy"), |b| {
            b.iter_batched_ref(
                || frame.clone(),
                |buf| Request::decode_from(buf).unwrap().unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn reply_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire_reply_encode");
    let mut buf = BytesMut::with_capacity(64 << 10);
    for (name, rep) in [("read_4k", read_reply()), ("ok", Reply::ok(44, 7))] {
        g.throughput(Throughput::Bytes(encoded_reply(&rep).len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                buf.clear();
                black_box(&rep).encode_into(&mut buf);
                black_box(buf.len())
            })
        });
    }
    g.finish();
}

fn reply_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire_reply_decode");
    for (name, rep) in [("read_4k", read_reply()), ("ok", Reply::ok(44, 7))] {
        let frame = encoded_reply(&rep);
        g.throughput(Throughput::Bytes(frame.len() as u64));
        g.bench_function(format!("{name}/decode_copy"), |b| {
            b.iter(|| Reply::decode(black_box(&frame)).unwrap())
        });
        g.bench_function(format!("{name}/decode_from_zero_copy"), |b| {
            b.iter_batched_ref(
                || frame.clone(),
                |buf| Reply::decode_from(buf).unwrap().unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
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
    targets = request_encode, request_decode, reply_encode, reply_decode
}
criterion_main!(benches);
