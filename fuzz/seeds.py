#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpus, fuzz/corpus/<target>/seed-*.

A handful of small inputs per target, each written from the format its
decoder documents (crates/qflare-protocol/src/tensor.rs, wire.rs,
channel.rs and handshake.rs, crates/qflare-enclave/src/frame.rs, and the
header of fuzz/fuzz_targets/update_validation.rs), so the fuzzer starts
inside every format rather than guessing its magic numbers. Some seeds are
valid, some are refused on purpose (an integer dtype, a gap in the data,
a replayed record), so the refusal paths start covered too.

Deterministic: run it again and the files are the same. The sealed record
needs the `cryptography` package (AES-256-GCM); without it that one seed is
skipped. Only files named seed-* are tracked by git (fuzz/.gitignore), so a
corpus grown in place never reaches a commit.

    python3 fuzz/seeds.py
"""

import base64
import json
import os
import random
import struct
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
RNG = random.Random(11)


def write(target, name, data):
    folder = os.path.join(ROOT, target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "seed-" + name), "wb") as f:
        f.write(data)


def noise(n):
    return bytes(RNG.getrandbits(8) for _ in range(n))


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- safetensors -------------------------------------------------------------


def encode_values(dtype, values):
    if dtype == "F32":
        return struct.pack("<%df" % len(values), *values)
    if dtype == "F16":
        return struct.pack("<%de" % len(values), *values)
    if dtype == "BF16":
        return b"".join(struct.pack("<I", struct.unpack("<I", struct.pack("<f", v))[0])[2:] for v in values)
    if dtype == "I64":
        return struct.pack("<%dq" % len(values), *(int(v) for v in values))
    raise ValueError(dtype)


def safetensors(tensors, metadata=True, pad=True, order=None, offsets=None):
    """tensors: [(name, dtype, shape, values)]; data laid out in list order."""
    header = {"__metadata__": {"format": "pt"}} if metadata else {}
    data = b""
    for i, (name, dtype, shape, values) in enumerate(tensors):
        raw = encode_values(dtype, values)
        begin, end = (len(data), len(data) + len(raw)) if offsets is None else offsets[i]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        data += raw
    if order is not None:
        header = {k: header[k] for k in order}
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + data


def tensors_seeds():
    weight = [1.0, -2.5, 0.0, 48.0, 0.125, -0.5]
    write("tensors", "f32.safetensors", safetensors([
        ("fc.bias", "F32", [2], [0.25, -0.5]),
        ("fc.weight", "F32", [2, 3], weight),
    ]))
    write("tensors", "f16.safetensors", safetensors([("layer.weight", "F16", [2, 3], weight)]))
    write("tensors", "bf16.safetensors", safetensors([("layer.weight", "BF16", [3, 2], weight)]))
    # Mixed dtypes, header keys in another order than the data, no
    # metadata, header not padded: all allowed, none canonical.
    write("tensors", "mixed.safetensors", safetensors([
        ("b/h16", "F16", [3], [1.0, float("inf"), -0.0]),
        ("a.f32", "F32", [1, 2], [3.5, float("nan")]),
        ("c-bf16", "BF16", [2], [65504.0, 1e-3]),
    ], metadata=False, pad=False, order=["c-bf16", "a.f32", "b/h16"]))
    write("tensors", "scalar-and-empty.safetensors", safetensors([
        ("empty", "F32", [0, 4], []),
        ("scalar", "F32", [], [9.0]),
    ]))
    write("tensors", "refused-i64.safetensors", safetensors([
        ("bn.num_batches_tracked", "I64", [], [3]),
        ("bn.weight", "F32", [2], [1.0, 1.0]),
    ]))
    write("tensors", "refused-gap.safetensors", safetensors(
        [("a", "F32", [1], [1.0]), ("b", "F32", [1], [2.0])], offsets=[(0, 4), (8, 12)]))
    write("tensors", "refused-rank.safetensors", safetensors([("deep", "F32", [1] * 9, [1.0])]))


# --- update_validation -------------------------------------------------------


def raw_update(flags, count, values):
    return bytes([flags & 0xDF, count]) + struct.pack("<8f", *values)


def file_update(flags, count, file):
    return bytes([flags | 0x20, count]) + struct.pack("<H", len(file)) + file


def layout_file(values, dtype="F32"):
    return safetensors([
        ("layer.bias", dtype, [2], values[:2]),
        ("layer.weight", dtype, [2, 3], values[2:]),
    ])


def honest(i):
    base = [0.1, 0.2, -0.1, 0.05, 0.0, 0.3, -0.2, 0.1]
    return [v + 0.01 * ((i * 7 + j) % 5 - 2) for j, v in enumerate(base)]


def settings(aggregator, defense, previous=False, tight=False, clip=False):
    return bytes([aggregator | defense << 3 | previous << 5 | tight << 6 | clip << 7])


def update_validation_seeds():
    fed_avg, trimmed, median, krum, fltrust = range(5)
    recommended, original, off, arrival = range(4)
    honest5 = b"".join(raw_update(i, 10 + i, honest(i)) for i in range(5))
    poisoned = raw_update(5, 50, [-40.0 * v for v in honest(5)])
    write("update_validation", "fedavg-off", settings(fed_avg, off) + honest5)
    write("update_validation", "arrival-clip",
          settings(fed_avg, arrival, previous=True, clip=True) + honest5 + poisoned)
    write("update_validation", "arrival-reject",
          settings(fed_avg, arrival, previous=True) + honest5 + poisoned)
    write("update_validation", "recommended-median", settings(median, recommended) + honest5 + poisoned)
    write("update_validation", "original-trimmed",
          settings(trimmed, original, previous=True) + honest5 + poisoned)
    write("update_validation", "krum", settings(krum, off) + honest5 + poisoned
          + raw_update(6, 12, honest(6)))
    write("update_validation", "fltrust", settings(fltrust, recommended) + honest5 + poisoned)
    write("update_validation", "tight-buffer", settings(trimmed, off, tight=True) + honest5)
    # Every arrival refusal once, then two valid files (F32 and F16).
    nan = honest(0)
    nan[3] = float("nan")
    refusals = b"".join([
        raw_update(0 | 0x08, 10, honest(0)),  # wrong round
        raw_update(0 | 0x10, 10, honest(0)),  # wrong model version
        raw_update(1, 0, honest(1)),  # no examples
        raw_update(2, 255, honest(2)),  # over the cap
        file_update(3, 10, safetensors([("layer.weight", "F32", [6], honest(3)[2:])])),  # wrong shape
        raw_update(4, 10, nan),  # not finite
        raw_update(4, 10, honest(4)),  # duplicate of the device just refused
        file_update(5, 20, layout_file(honest(5))),
        file_update(6, 30, layout_file([0.5, -0.25, 1.0, 2.0, -1.0, 0.125, 0.75, -0.5], "F16")),
    ])
    write("update_validation", "refusals", settings(fed_avg, recommended) + refusals)


# --- enclave_frame -----------------------------------------------------------


def frame(kind, meta, blobs=()):
    meta = json.dumps(meta, separators=(",", ":")).encode()
    body = struct.pack(">I", len(meta)) + meta + struct.pack(">I", len(blobs))
    for blob in blobs:
        body += struct.pack(">Q", len(blob)) + blob
    return b"QFLE" + bytes([1, kind]) + b"\0\0" + struct.pack(">I", len(body)) + body


def enclave_frame_seeds():
    device = "3f9a0c1e5b7d4f2a8c6e0b1d3f5a7c9e"
    write("enclave_frame", "attest", frame(0x01, {"nonce": b64(noise(32))}))
    write("enclave_frame", "submit", frame(0x05, {"device_id": device}, [noise(96)]))
    write("enclave_frame", "begin-round", frame(0x04, {
        "round_id": 7, "model_version": 3, "architecture": "mnist-2nn", "config": {},
        "devices": [{"device_id": device}],
    }, [layout_file(honest(0)), b""]))
    write("enclave_frame", "finalize", frame(0x06, {}))
    write("enclave_frame", "error", frame(0xFF, {"code": "malformed_frame", "message": "truncated"}))


# --- stored_state ------------------------------------------------------------


def stored_state_seeds():
    secrets = bytes([7] * 32 + [8] * 12 + [9] * 32 + [10] * 12)
    write("stored_state", "session-secrets", secrets)
    pending = (bytes(range(16)) + bytes(range(16, 32)) + struct.pack(">QQ", 1795497321, 1795493781)
               + noise(48) + secrets + noise(32))
    write("stored_state", "pending-handshake", pending)


# --- sealed_record -----------------------------------------------------------


def sealed_record_seeds():
    # The target opens POST /v1/updates records under session id [1; 16] and
    # secrets [7; 88] (the c2s key and IV used as they are), expecting seq > 0.
    session, key, iv = bytes([1] * 16), bytes([7] * 32), bytes([7] * 12)
    method, path = b"POST", b"/v1/updates"

    def aad(seq):
        return (b"qflare v1 record" + session + b"\x01" + struct.pack(">Q", seq)
                + struct.pack(">H", len(method)) + method + struct.pack(">I", len(path)) + path)

    def nonce(seq):
        return iv[:4] + bytes(a ^ b for a, b in zip(iv[4:], struct.pack(">Q", seq)))

    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        print("seeds: no `cryptography` package; skipping the valid sealed record", file=sys.stderr)
    else:
        body = json.dumps({"envelope": b64(noise(48))}).encode()
        sealed = AESGCM(key).encrypt(nonce(1), body, aad(1))
        write("sealed_record", "valid", sealed + struct.pack(">Q", 1))
        write("sealed_record", "replayed-seq0", AESGCM(key).encrypt(nonce(0), b"{}", aad(0)) + struct.pack(">Q", 0))
    write("sealed_record", "bad-tag", noise(40) + struct.pack(">Q", 2))
    write("sealed_record", "overhead-only", noise(16) + struct.pack(">Q", 3))


# --- wire_messages -----------------------------------------------------------


def wire_messages_seeds():
    device, session = "3f9a0c1e5b7d4f2a8c6e0b1d3f5a7c9e", "9c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f"
    messages = {
        "enroll-request": {
            "version": 1, "token": b64(noise(32)), "device_name": "edge-01",
            "kem_suite": "ml-kem-768", "kem_public_key": b64(noise(1184)),
            "signature_suite": "ml-dsa-65", "verifying_key": b64(noise(1952)),
            "server_fingerprint": noise(32).hex(), "proof": b64(noise(3309)),
        },
        "enroll-response": {"version": 1, "device_id": device, "enrolled_at": 1795493721,
                            "signature": b64(noise(3309))},
        "client-hello": {"version": 1, "device_id": device, "kem_suite": "ml-kem-768",
                         "ephemeral_public_key": b64(noise(1184)), "client_nonce": b64(noise(32))},
        "server-hello": {"version": 1, "session_id": session, "server_nonce": b64(noise(32)),
                         "static_ciphertext": b64(noise(1088)), "ephemeral_ciphertext": b64(noise(1088)),
                         "expires_at": 1795497321, "signature": b64(noise(3309))},
        "client-confirm": {"version": 1, "session_id": session, "signature": b64(noise(3309)),
                           "key_confirmation": b64(noise(32))},
        "update-envelope": {"version": 1, "round_id": 7, "device_id": device, "model_version": 3,
                            "kem_suite": "frodokem-640-aes", "kem_ciphertext": b64(noise(96)),
                            "sealed_payload": b64(noise(160)), "outer_signature": b64(noise(64))},
        "attestation-report": {"version": 1, "mode": "software", "measurement": noise(48).hex(),
                               "kem_suite": "ml-kem-1024", "kem_public_key": b64(noise(64)),
                               "signature_suite": "ml-dsa-87", "verifying_key": b64(noise(64)),
                               "nonce": b64(noise(32)), "issued_at": 1795493721,
                               "evidence": "", "signature": b64(noise(64))},
        "model-certificate": {"version": 1, "architecture": "mnist-cnn", "model_version": 3,
                              "round_id": 7, "model_sha256": noise(32).hex(), "signature": b64(noise(64))},
    }
    for name, message in messages.items():
        write("wire_messages", name + ".json", json.dumps(message).encode())


# --- hardware_evidence -------------------------------------------------------
# The formats of crates/qflare-attest/src/evidence.rs: JSON around an SNP
# report (AMD's ATTESTATION_REPORT layout), a DCAP quote with collateral, or
# a Nitro COSE_Sign1 document. Synthetic throughout (the published evidence
# under QFLARE_VECTORS_DIR is not copied into the project).


def cbor(value):
    """A minimal canonical CBOR encoder: what a Nitro document holds."""
    def head(major, n):
        if n < 24:
            return bytes([major << 5 | n])
        for info, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
            if n < 1 << (8 * struct.calcsize(fmt)):
                return bytes([major << 5 | info]) + struct.pack(fmt, n)
        raise ValueError(n)
    if value is None:
        return b"\xf6"
    if isinstance(value, int):
        return head(0, value) if value >= 0 else head(1, -1 - value)
    if isinstance(value, bytes):
        return head(2, len(value)) + value
    if isinstance(value, str):
        data = value.encode()
        return head(3, len(data)) + data
    if isinstance(value, list):
        return head(4, len(value)) + b"".join(cbor(v) for v in value)
    if isinstance(value, dict):
        return head(5, len(value)) + b"".join(cbor(k) + cbor(v) for k, v in value.items())
    raise TypeError(value)


def snp_report(debug=False):
    report = bytearray(0x4A0)
    struct.pack_into("<IIQ", report, 0, 2, 0, 0x30000 | (1 << 19 if debug else 0))
    struct.pack_into("<I", report, 0x34, 1)
    report[0x50:0x90] = noise(64)
    report[0x90:0xC0] = noise(48)
    report[0x1A0:0x1E0] = noise(64)
    report[0x2A0:0x2D0] = noise(48)
    report[0x2E8:0x318] = noise(48)
    return bytes(report)


def pem(der):
    body = base64.b64encode(der).decode()
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"


def hardware_evidence_seeds():
    write("hardware_evidence", "sev-snp.json", json.dumps(
        {"kind": "sev-snp", "report": b64(snp_report()), "vcek": b64(b"\x30\x82\x05\x00" + noise(1280))}
    ).encode())
    write("hardware_evidence", "sev-snp-debug.json", json.dumps(
        {"kind": "sev-snp", "report": b64(snp_report(debug=True)), "vcek": b64(noise(64))}
    ).encode())
    # Quote v4: header (version, attestation key type, TEE type 0x81 = TDX,
    # reserved, QE vendor id, user data), the 584-byte TD report, then the
    # signature data's length and an ECDSA signature, key and certification data.
    header = struct.pack("<HHI", 4, 2, 0x81) + bytes(4) + noise(16) + noise(20)
    body = noise(584)
    signature_data = noise(64) + noise(64) + struct.pack("<HI", 6, 64) + noise(64)
    quote = header + body + struct.pack("<I", len(signature_data)) + signature_data
    chain = pem(b"\x30\x82\x02\x00" + noise(128)) + pem(b"\x30\x82\x02\x00" + noise(128))
    collateral = {
        "pck_crl_issuer_chain": chain, "root_ca_crl": noise(64).hex(), "pck_crl": noise(64).hex(),
        "tcb_info_issuer_chain": chain,
        "tcb_info": json.dumps({"id": "TDX", "version": 3, "issueDate": "2025-06-19T10:16:03Z",
                                "nextUpdate": "2025-07-19T10:16:03Z", "tcbLevels": []}),
        "tcb_info_signature": noise(64).hex(), "qe_identity_issuer_chain": chain,
        "qe_identity": json.dumps({"id": "TD_QE", "version": 2, "issueDate": "2025-06-19T10:32:27Z"}),
        "qe_identity_signature": noise(64).hex(),
    }
    write("hardware_evidence", "tdx.json", json.dumps(
        {"kind": "tdx", "quote": b64(quote), "collateral": collateral}
    ).encode())
    payload = {
        "module_id": "i-0123456789abcdef0-enc0123456789abcdef", "digest": "SHA384",
        "timestamp": 1665651482136, "pcrs": {i: noise(48) for i in range(5)},
        "certificate": b"\x30\x82\x02\x80" + noise(128),
        "cabundle": [b"\x30\x82\x02\x10" + noise(96) for _ in range(4)],
        "public_key": None, "user_data": noise(64), "nonce": None,
    }
    protected = cbor({1: -35})
    document = cbor([protected, {}, cbor(payload), noise(96)])
    write("hardware_evidence", "nitro.json", json.dumps(
        {"kind": "nitro", "document": b64(document)}
    ).encode())
    write("hardware_evidence", "nitro-payload.cbor", cbor(payload))
    write("hardware_evidence", "snp-report.bin", snp_report())
    write("hardware_evidence", "tdx-quote.bin", quote)


if __name__ == "__main__":
    tensors_seeds()
    update_validation_seeds()
    enclave_frame_seeds()
    stored_state_seeds()
    sealed_record_seeds()
    wire_messages_seeds()
    hardware_evidence_seeds()
