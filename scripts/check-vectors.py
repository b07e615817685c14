#!/usr/bin/env python3
"""Checks spec/vectors against the spec pages with independent code:
Python's `cryptography` (AES-GCM, ed25519) and `blake3`, and parsers
written from the tables of spec/*.md, not from the Rust sources."""
import json
import pathlib
import struct
import sys

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VECTORS = pathlib.Path(__file__).resolve().parent.parent / "spec" / "vectors"


def load(name):
    return json.loads((VECTORS / name).read_text())


def h(text):
    return bytes.fromhex(text)


class Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, n):
        assert self.pos + n <= len(self.data), "truncated"
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self):
        return self.take(1)[0]

    def u16(self):
        return struct.unpack(">H", self.take(2))[0]

    def u32(self):
        return struct.unpack(">I", self.take(4))[0]

    def u64(self):
        return struct.unpack(">Q", self.take(8))[0]

    def str16(self, limit):
        n = self.u16()
        assert n <= limit
        return self.take(n).decode()

    def done(self):
        assert self.pos == len(self.data), "trailing bytes"


def check_ids():
    v = load("ids.json")
    for f in v["fragments"]:
        assert blake3.blake3(h(f["bytes"])).hexdigest() == f["fragment_id"]
    for ver in v["versions"]:
        ms = min(ver["unix_ms"], 2**48 - 1)
        assert (ms.to_bytes(6, "big") + h(ver["random"])).hex() == ver["text"]


def check_stream():
    for case in load("stream.json")["cases"]:
        aead, chunk = AESGCM(h(case["key"])), case["chunk_size"]
        sealed, plain = h(case["ciphertext"]), h(case["plaintext"])
        chunks = max(1, -(-len(plain) // chunk))
        assert len(sealed) == len(plain) + 16 * chunks
        out = b""
        for i in range(chunks):
            piece = sealed[i * (chunk + 16):(i + 1) * (chunk + 16)]
            nonce = struct.pack(">I", case["stream_id"]) + i.to_bytes(7, "big") + bytes([i == chunks - 1])
            out += aead.decrypt(nonce, piece, None)
        assert out == plain
    part = load("stream.json")["part_stream_key"]
    derived = derive("cairn 2026-12 part stream key v1", h(part["data_key"]) + h(part["attempt"]))
    assert derived.hex() == part["part_stream_key"]


def check_keywrap():
    v = load("keywrap.json")
    wrapped = h(v["wrapped"])
    assert len(wrapped) == 73 and wrapped[0] == 1 and wrapped[1:25] == h(v["salt"])
    one_time = blake3.blake3(h(v["kek"]) + wrapped[1:25], derive_key_context="cairn 2026-11 data key wrap v1").digest()
    bucket, key = v["bucket"].encode(), v["key"].encode()
    aad = struct.pack(">I", len(bucket)) + bucket + struct.pack(">I", len(key)) + key + h(v["version"])
    assert AESGCM(one_time).decrypt(bytes(12), wrapped[25:], aad) == h(v["data_key"])


def check_gateway():
    v = load("gateway.json")
    lk = v["labelled_key"]
    wrapped = h(lk["wrapped"])
    assert len(wrapped) == 73 and wrapped[0] == 1 and wrapped[1:25] == h(lk["salt"])
    one_time = blake3.blake3(h(lk["kek"]) + wrapped[1:25], derive_key_context="cairn 2026-11 data key wrap v1").digest()
    aad = b"cairn key label v1\x00" + lk["label"].encode()
    assert AESGCM(one_time).decrypt(bytes(12), wrapped[25:], aad) == h(lk["key"])
    r = Reader(h(v["bucket_record"]))
    assert r.u8() == 1
    r.u64(), r.str16(128), r.str16(256)
    r.done()
    # Bucket settings: generation, versioning, Object Lock, default
    # retention (mode, then unit and count when the mode is not 0).
    for raw in v["bucket_settings"]:
        r = Reader(h(raw))
        assert r.u8() == 2
        r.str16(256)
        r.u64()
        versioning = r.u8()
        lock = r.u8()
        assert versioning in (0, 1, 2) and lock in (0, 1)
        assert not lock or versioning == 1
        mode = r.u8()
        assert mode in (0, 1, 2) and (mode == 0 or lock)
        if mode:
            assert r.u8() in (0, 1) and r.u32() >= 1
        r.done()
    # Lifecycle: generation, then each rule's id, status, prefix, sizes,
    # expiration, noncurrent expiration and abort of incomplete uploads.
    r = Reader(h(v["lifecycle_configuration"]))
    assert r.u8() == 1
    r.str16(256)
    rules = []
    for _ in range(r.u32()):
        rule = [r.str16(255)]
        assert r.u8() in (0, 1)
        rule.append(r.str16(1024))
        for _ in range(2):
            if r.u8():
                rule.append(r.u64())
        kind = r.u8()
        assert kind in (0, 1, 2, 3)
        rule.append({1: lambda: r.u32(), 2: lambda: r.u64()}.get(kind, lambda: kind)())
        if r.u8():
            rule.append((r.u32(), r.u32()))
        if r.u8():
            rule.append(r.u32())
        rules.append(rule)
    r.done()
    assert rules[0] == ["logs", "logs/", 1024, 30, (7, 2), 3]
    assert rules[1] == ["markers", "", 3]
    # A date at midnight UTC.
    assert rules[2][3] == 1_893_456_000_000 and rules[2][3] % 86_400_000 == 0
    for name in ("access_key_record", "kms_key_record"):
        r = Reader(h(v[name]))
        # Access key records are format 2 (permissions after the secret).
        assert r.u8() == (2 if name == "access_key_record" else 1)
        r.u64()
        if name == "access_key_record":
            r.str16(256)
        assert r.take(r.u16()) == wrapped
        if name == "access_key_record":
            assert r.u64() == 1
        r.done()
    r = Reader(h(v["upload_record"]))
    assert r.u8() == 1
    r.take(16), r.u64()
    assert r.u8() in (0, 1)
    r.u8(), r.u8(), r.str16(256)
    assert r.take(r.u16()) == wrapped
    names = [(r.str16(8192), r.str16(8192))[0] for _ in range(r.u32())]
    assert names == sorted(set(names))
    r.done()
    for raw, (kind, id_len) in zip(v["release_records"], [(1, 16), (2, 32)]):
        r = Reader(h(raw))
        assert r.u8() == 1
        r.u64()
        assert r.u8() == kind
        r.take(id_len)
        r.done()
    r = Reader(h(v["degraded_record"]))
    assert r.u8() == 1
    r.u64()
    count = r.u8()
    r.take(32 * count)
    missing = r.take(r.u8())
    assert list(missing) == sorted(set(missing)) and all(i < count for i in missing)
    r.done()
    r = Reader(h(v["part_record"]))
    assert r.u8() == 2
    r.take(16), r.u64(), r.u64(), r.str16(64)
    algorithm, value = r.str16(16), r.str16(64)
    assert (algorithm == "") == (value == "")
    k, m = r.u8(), r.u8()
    for _ in range(r.u32()):
        r.u32(), r.take(32 * (k + m))
    r.done()


def check_erasure():
    for case in load("erasure.json")["cases"]:
        k, m, segment = case["k"], case["m"], h(case["segment"])
        frags = [h(f) for f in case["fragments"]]
        assert len(frags) == k + m
        if k == 1:
            assert all(f == segment for f in frags)
        else:
            size = -(-len(segment) // k)
            size += size & 1
            padded = segment + bytes(size * k - len(segment))
            for i in range(k):
                assert frags[i] == padded[i * size:(i + 1) * size]
            assert all(len(f) == size for f in frags)
        for f, fid in zip(frags, case["fragment_ids"]):
            assert blake3.blake3(f).hexdigest() == fid


def check_manifest():
    v = load("manifest.json")
    encoded = h(v["encoded"])
    body, signature = encoded[:-64], encoded[-64:]
    assert blake3.blake3(body).hexdigest() == v["manifest_id"]
    r = Reader(body)
    assert r.take(4) == b"CRNM" and r.u16() == 2
    writer = r.take(32)
    public = Ed25519PrivateKey.from_private_bytes(h(v["writer_secret_key"])).public_key().public_bytes_raw()
    assert writer == public
    Ed25519PublicKey.from_public_bytes(writer).verify(signature, body)
    r.u64()
    r.str16(63), r.str16(1024), r.take(16), r.take(16)
    k, m = r.u8(), r.u8()
    chunk, per_segment = r.u32(), r.u32()
    assert r.u8() in (1, 2, 3)
    r.str16(2048)
    r.take(r.u16())
    r.str16(64)
    previous = -1
    for _ in range(r.u32()):
        number, _upload, length, count = r.u32(), r.take(16), r.u64(), r.u32()
        assert number > previous
        previous = number
        cipher_len = length + 16 * max(1, -(-length // chunk))
        full = per_segment * (chunk + 16)
        expected = [min(full, cipher_len - i * full) for i in range(-(-cipher_len // full))]
        got = []
        for _ in range(count):
            got.append(r.u32())
            r.take(32 * (k + m))
        assert got == expected
    r.done()


def check_wire():
    names = ["hello", "put_fragment", "data", "ack", "reject", "get_fragment", "fragment_header", "have_query",
             "have_reply", "inventory_query", "inventory_digest", "inventory_list", "inventory_page", "cancel",
             "release", "released", "status_query", "status_reply", "restore", "restored",
             "drop_copy", "dropped", "keep_check", "get_any", "have_held", "lock_fragments",
             "fragments_locked"]
    for i, frame in enumerate(load("wire.json")["frames"]):
        raw = h(frame["frame"])
        assert frame["message"] == names[i]
        assert struct.unpack(">I", raw[:4])[0] == len(raw) - 4 and raw[4] == i + 1
        if frame["message"] == "put_fragment":
            p = raw[5:]
            fragment, upload, obj, until = p[:32], p[40:56], p[56:88], p[88:96]
            writer, sig = p[96:128], p[128:192]
            # The object key digest binds the hold to photos/2026/cat.jpg.
            named = struct.pack(">H", len(b"photos")) + b"photos" + b"2026/cat.jpg"
            assert obj == blake3.blake3(named, derive_key_context="cairn object key digest v1").digest()
            Ed25519PublicKey.from_public_bytes(writer).verify(sig, b"cairn hold v2" + fragment + upload + obj + until)
            assert len(p) == 192
        if frame["message"] == "release":
            r = Reader(raw[5 + 16:])
            assert r.str16(63) == "photos" and r.str16(1024) == "2026/cat.jpg"
            r.done()
        if frame["message"] == "released":
            assert len(raw) == 5 + 16
        if frame["message"] == "status_query":
            assert len(raw) == 6 and raw[5] in (0, 1)
        if frame["message"] == "status_reply":
            n = [struct.unpack(">Q", raw[5 + 8 * i:13 + 8 * i])[0] for i in range(26)]
            live, trash, quarantined, trash_period, grace = n[3], n[4], n[5], n[6], n[7]
            segments, whole, unreadable = n[18], n[19], n[20]
            assert (live, trash, quarantined) == (2048, 3, 1) and n[0] == 1 << 40
            assert (trash_period, grace) == (7 * 24 * 3600 * 1000, 7 * 3600 * 1000)
            assert n[16] == 1_764_000_700_000
            count = struct.unpack(">I", raw[5 + 208:9 + 208])[0]
            table = [(raw[217 + 9 * i], struct.unpack(">Q", raw[218 + 9 * i:226 + 9 * i])[0]) for i in range(count)]
            end = 217 + 9 * count
            assert table == [(0, 1), (1, 2)] and len(raw) == end + 8 * 9
            lifecycle = [struct.unpack(">Q", raw[end + 8 * i:end + 8 + 8 * i])[0] for i in range(9)]
            assert lifecycle == [12, 1_764_000_800_000, 2, 40, 30, 5, 3, 1, 0]
            assert whole + sum(c for _, c in table) + unreadable + 0 == segments
        if frame["message"] == "get_any":
            r = Reader(raw[5:])
            count = r.u8()
            assert 1 <= count <= 32
            ids = [r.take(32) for _ in range(count)]
            assert ids[1] == bytes([0x2a] * 32) and (r.u64(), r.u64()) == (4096, 8192)
            r.done()
        if frame["message"] == "have_held":
            r = Reader(raw[5:])
            r.take(16)
            named = struct.pack(">H", len(b"photos")) + b"photos" + b"2026/cat.jpg"
            assert r.take(32) == blake3.blake3(named, derive_key_context="cairn object key digest v1").digest()
            count = r.u32()
            assert count == 2 and [r.take(32) for _ in range(count)][1] == bytes([0x2a] * 32)
            r.done()
        if frame["message"] == "lock_fragments":
            r = Reader(raw[5:])
            count = r.u32()
            assert count == 2 and [r.take(16) for _ in range(count)] == [bytes([0x4d] * 16), bytes([0x4e] * 16)]
            assert r.str16(63) == "photos" and r.str16(1024) == "2026/cat.jpg"
            assert r.take(16) == bytes([0x5e] * 16)
            assert r.u64() == 1_900_000_000_000 and r.u64() == 1_800_000_000_000
            r.done()
        if frame["message"] == "fragments_locked":
            assert len(raw) == 5 + 8 and struct.unpack(">Q", raw[5:])[0] == 12
        if frame["message"] == "restore":
            r = Reader(raw[5 + 16:])
            assert r.str16(63) == "photos" and r.str16(1024) == "2026/cat.jpg"
            r.done()
        if frame["message"] == "restored":
            assert len(raw) == 5 + 8
        if frame["message"] == "drop_copy":
            r = Reader(raw[5 + 32:])
            assert r.str16(63) == "photos" and r.str16(1024) == "2026/cat.jpg"
            assert r.take(16) == bytes([0x5e] * 16) and r.take(32) == bytes([0x6b] * 32)
            r.done()
        if frame["message"] == "dropped":
            assert len(raw) == 5
        if frame["message"] == "keep_check":
            r = Reader(raw[5 + 32:])
            assert r.str16(63) == "photos" and r.str16(1024) == "2026/cat.jpg"
            assert r.take(16) == bytes([0x5e] * 16) and r.take(16) == bytes([0x4d] * 16)
            r.done()


def check_versions():
    for raw in load("version.json").values():
        r = Reader(h(raw))
        # Format 2 carries the head sequence after `created`; format 3
        # (a version with its own id) flags after it, only bit 0 set;
        # format 4 (a retention a guard decided) flags, bit 0 or none, and
        # the retention's stamp after its date.
        fmt = r.u8()
        assert fmt in (2, 3, 4)
        r.str16(63), r.str16(1024), r.take(16), r.take(40)
        r.u64()
        if fmt == 3:
            assert r.u8() == 1
        if fmt == 4:
            assert r.u8() in (0, 1)
        if r.u8() == 1:
            r.take(32), r.u64(), r.str16(64)
            names = [(r.str16(8192), r.str16(8192))[0] for _ in range(r.u32())]
            assert names == sorted(set(names)) and all(n == n.lower() for n in names)
        assert r.u8() in (0, 1, 2)
        r.u64()
        if fmt == 4:
            assert r.take(40) != bytes(40)
        assert r.u8() in (0, 1)
        r.take(40)
        if r.u8() == 1:
            r.take(40)
        r.done()


def check_membership():
    v = load("membership.json")
    cluster = Ed25519PrivateKey.from_private_bytes(h(v["cluster_secret_key"])).public_key().public_bytes_raw()
    assert cluster.hex() == v["cluster_id"]
    for name, magic in (("certificate", b"CRNE"), ("map", b"CRNP")):
        raw = h(v[name])
        body, signature = raw[:-64], raw[-64:]
        Ed25519PublicKey.from_public_bytes(cluster).verify(signature, body)
        r = Reader(body)
        # Certificates are format 1; maps format 3 (with the metadata
        # replicas, and each node's since).
        assert r.take(4) == magic and r.u16() == (1 if name == "certificate" else 3)
        assert r.take(32) == cluster
        if name == "certificate":
            r.take(32), r.str16(63), r.u64(), r.u64()
        else:
            version = r.u64()
            r.u8(), r.u8(), r.u8()
            assert 1 <= r.u8() <= 15
            for _ in range(r.u32()):
                r.take(32), r.str16(63), r.u64()
                assert r.u8() in (0, 1, 2, 3)
                assert r.u64() <= version
        r.done()


def check_dht():
    v = load("dht.json")
    assert h(v["upload_provider_key"]) == b"\x01" + h(v["upload_id"])
    # An ed25519 peer id: identity multihash of the protobuf public key.
    key = Ed25519PrivateKey.from_private_bytes(bytes([7] * 32)).public_key().public_bytes_raw()
    peer = h(v["publisher_peer_id"])
    assert peer == bytes([0x00, 36, 0x08, 0x01, 0x12, 32]) + key
    r = Reader(h(v["record"]["encoded"]))
    assert r.u8() == 1 and r.u64() == v["record"]["expires_unix_ms"]
    assert r.take(r.u16()) == peer
    assert r.take(len(r.data) - r.pos) == h(v["record"]["value"])
    r.done()
    assert h(v["record_without_publisher"]["encoded"]) == bytes([1]) + bytes(8) + bytes(2)
    r = Reader(h(v["provider"]["encoded"]))
    assert r.u8() == 1 and r.u64() == v["provider"]["expires_unix_ms"]
    assert [r.take(r.u16()).hex() for _ in range(r.u16())] == v["provider"]["addresses"]
    r.done()


def derive(context, data):
    return blake3.blake3(data, derive_key_context=context).digest()


def check_meta():
    v = load("meta.json")
    row = v["register_row"]
    # RowValue kind 1: Timestamp (hlc u64, node [32]), present, bytes32.
    r = Reader(h(row["encoded"]))
    assert r.u8() == 1 and r.u64() == row["hlc"] and r.take(32) == h(row["node"])
    assert r.u8() == 1 and r.take(r.u32()) == h(row["value"])
    r.done()
    sort, table = h(row["sort"]), row["table"]
    assert derive("cairn 2026-11 metadata leaf v1", bytes([table]) + sort)[0] == row["leaf"]
    digest = derive(
        "cairn 2026-11 metadata row v1",
        bytes([table]) + struct.pack(">H", len(sort)) + sort + h(row["encoded"]),
    )
    assert digest == h(row["row_digest"])
    leaves = [bytes(32)] * 256
    leaves[row["leaf"]] = digest
    assert derive("cairn 2026-11 metadata root v1", b"".join(leaves)) == h(row["partition_root"])

    vs = v["version_sort_key"]
    inverted = bytes(b ^ 0xFF for b in h(vs["version"]))
    assert h(vs["sort"]) == vs["key"].encode() + b"\x00" + inverted

    rep = v["replicas"]
    key = derive("cairn 2026-11 metadata partition v1", rep["partition"].encode())
    assert key == h(rep["placement_key"])
    ranked = sorted(
        rep["nodes"],
        key=lambda n: derive("cairn 2026-11 metadata replicas v1", key + h(n["id"])),
    )
    chosen, sites = [], set()
    for n in ranked:
        if len(chosen) < 3 and n["site"] not in sites:
            sites.add(n["site"])
            chosen.append(n["id"])
    for n in ranked:
        if len(chosen) < 3 and n["id"] not in chosen:
            chosen.append(n["id"])
    assert chosen == rep["replicas_3"]

    tv = v["tagged_value"]
    assert h(tv["encoded"]) == h(tv["operation"]) + b"\x01" + struct.pack(">I", len(h(tv["value"]))) + h(tv["value"])

    g = v["guard"]
    r = Reader(h(g["encoded"]))
    # Format 2: the retention's stamp after its date.
    assert r.u8() == 2 and r.u8() == g["mode"] and r.u64() == g["retain_until_unix_ms"]
    assert r.u64() == row["hlc"] and r.take(32) == h(row["node"])
    assert r.u8() == int(g["legal_hold"]) and r.u64() == row["hlc"] and r.take(32) == h(row["node"])
    assert r.u8() == int(g["purged"])
    r.done()

    # Write: 0x01, count, RowKey (partition str16, table, sort bytes16), RowValue.
    r = Reader(h(v["requests"]["write"]))
    assert r.u8() == 0x01 and r.u32() == 1
    assert r.str16(63) == row["partition"] and r.u8() == table and r.take(r.u16()) == sort
    assert r.take(len(row["encoded"]) // 2) == h(row["encoded"])
    r.done()
    # A call: the sender's map version, then the request.
    call = h(v["requests"]["call_write"])
    assert call == struct.pack(">Q", v["requests"]["call_map_version"]) + h(v["requests"]["write"])
    # Accept: 0x11, RegisterKey, Ballot (round, node), OptBytes.
    r = Reader(h(v["requests"]["accept"]))
    assert r.u8() == 0x11 and r.str16(63) == "photos" and r.take(r.u16()) == b"cat.jpg"
    assert r.u64() == 7 and r.take(32) == bytes([0x22] * 32)
    assert r.u8() == 1 and r.take(r.u32()) == h(tv["encoded"])
    r.done()
    # Promise: 0x90, has_accepted, Ballot, OptBytes.
    r = Reader(h(v["responses"]["promise"]))
    assert r.u8() == 0x90 and r.u8() == 1 and r.u64() == 7 and r.take(32) == bytes([0x22] * 32)
    assert r.u8() == 1 and r.take(r.u32()) == h(tv["encoded"])
    r.done()
    assert h(v["responses"]["written"]) == b"\x81"
    # ReadRegister: 0x12, RegisterKey; RegisterState: 0x93, as Promise.
    r = Reader(h(v["requests"]["read_register"]))
    assert r.u8() == 0x12 and r.str16(63) == "photos" and r.take(r.u16()) == b"cat.jpg"
    r.done()
    assert h(v["responses"]["register_state"]) == b"\x93" + h(v["responses"]["promise"])[1:]


def check_placement_key():
    v = load("placement.json")
    ids = b"".join(h(f) for f in v["segment_fragments"])
    assert derive("cairn 2026-11 segment placement v1", ids) == h(v["segment_placement_key"])


checks = [check_gateway, check_placement_key, check_meta, check_dht, check_membership, check_ids, check_stream, check_keywrap, check_erasure, check_manifest, check_wire, check_versions]
failed = 0
for check in checks:
    try:
        check()
    except Exception as error:  # report every failing family, not just the first
        failed += 1
        print(f"{check.__name__}: FAILED: {error!r}")
print(f"vectors: {len(checks) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
