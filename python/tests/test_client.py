"""The SDK's low-level `Client` (one step per call) and its exceptions:
devices driving their own loop, a revoked device, a wrong server key."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy

import qflare
from conftest import SoftmaxDevice, free_port, run_in_threads, shards


def test_a_hand_written_loop_federates_and_reports_evaluations(start_server, tmp_path, mnist):
    server = start_server(
        architecture="custom", auto_start=True, clients_per_round=2, min_updates=2,
        max_rounds=2, round_timeout_secs=120, poll_interval_secs=1,
        training={"learning_rate": 0.5, "batch_size": 32, "epochs": 1},
    )
    safetensors.numpy.save_file(SoftmaxDevice.initial(), str(tmp_path / "m.safetensors"))
    server.admin("model", "init", "--from", str(tmp_path / "m.safetensors"), "--name", "softmax")
    devices = shards(mnist, 2, train_per_device=1000, test_per_device=300)
    for k in range(2):
        server.enroll(tmp_path / f"d{k}")

    def loop(k):
        client = qflare.Client(str(tmp_path / f"d{k}"), enclave_measurements=[server.measurement],
                               allow_software_attestation=True)
        receipts = []
        while (round := client.wait_for_round(timeout=120)) is not None:
            assert round.model == "softmax" and round.config["learning_rate"] == 0.5
            loss, n_test, metrics = devices[k].evaluate(round.weights, round.config)
            client.evaluate(round, n_test, {"loss": loss, **metrics})
            config = {**round.config, "seed": k}
            weights, n, _ = devices[k].fit(round.weights, config)
            receipts.append(client.submit(round, weights, n))
        return receipts

    results = run_in_threads({f"d{k}": (lambda k=k: loop(k)) for k in range(2)})
    for name, receipts in results.items():
        assert isinstance(receipts, list), f"{name}: {receipts!r}\n{server.log()}"
        assert [r["round_id"] for r in receipts] == [1, 2], receipts
    models = {m["version"]: m for m in server.status()["models"]}
    assert models[1]["federated"]["devices"] == 2
    assert models[1]["federated"]["examples"] == 600
    assert models[1]["federated"]["metrics"]["accuracy"] > models[0]["federated"]["metrics"]["accuracy"]


def test_shape_checks_come_before_sealing(start_server, tmp_path):
    server = start_server(
        architecture="custom", auto_start=True, clients_per_round=1, min_updates=1,
        max_rounds=1, round_timeout_secs=60, poll_interval_secs=1,
    )
    safetensors.numpy.save_file(SoftmaxDevice.initial(), str(tmp_path / "m.safetensors"))
    server.admin("model", "init", "--from", str(tmp_path / "m.safetensors"), "--name", "softmax")
    server.enroll(tmp_path / "d")
    client = qflare.Client(str(tmp_path / "d"), enclave_measurements=[server.measurement],
                           allow_software_attestation=True)
    round = client.wait_for_round(timeout=60)
    weights = round.weights
    weights["linear.weight"] = np.ones((784, 10), np.float32)
    with pytest.raises(qflare.ShapeMismatch, match=r"tensor linear.weight has shape \[784, 10\]"):
        client.submit(round, weights, 10)
    # The refused update was never sent: the device may still submit a good one.
    receipt = client.submit(round, round.weights, 10)
    assert receipt["round_id"] == 1


def test_an_unsandboxed_enclave_is_refused_unless_allowed(start_server, tmp_path):
    # The operator starts the enclave with its sandbox off; its signed report says so.
    server = start_server(
        enclave_args=["--seccomp", "log"],
        architecture="custom", auto_start=True, clients_per_round=1, min_updates=1,
        max_rounds=1, round_timeout_secs=60, poll_interval_secs=1,
    )
    safetensors.numpy.save_file(SoftmaxDevice.initial(), str(tmp_path / "m.safetensors"))
    server.admin("model", "init", "--from", str(tmp_path / "m.safetensors"), "--name", "softmax")
    server.enroll(tmp_path / "d")
    refusing = qflare.Client(str(tmp_path / "d"), enclave_measurements=[server.measurement],
                             allow_software_attestation=True)
    with pytest.raises(qflare.AttestationRefused, match="sandbox"):
        refusing.wait_for_round(timeout=60)
    allowing = qflare.Client(str(tmp_path / "d"), enclave_measurements=[server.measurement],
                             allow_software_attestation=True, allow_unsandboxed_enclave=True)
    round = allowing.wait_for_round(timeout=60)
    assert round is not None and round.model == "softmax"


def test_a_hardware_only_device_refuses_a_software_enclave(start_server, tmp_path):
    # A device that trusts only Nitro enclaves (and says which image) meets
    # the server's software-mode enclave: refused, by mode, before any model.
    server = start_server(architecture="custom", auto_start=True, clients_per_round=1,
                          min_updates=1, max_rounds=1, round_timeout_secs=60, poll_interval_secs=1)
    safetensors.numpy.save_file(SoftmaxDevice.initial(), str(tmp_path / "m.safetensors"))
    server.admin("model", "init", "--from", str(tmp_path / "m.safetensors"), "--name", "softmax")
    server.enroll(tmp_path / "d")
    nitro_only = {"nitro": {"pcr0": ["ab" * 48]}}
    device = qflare.Client(str(tmp_path / "d"), enclave_measurements=[],
                           hardware_policy=nitro_only)
    with pytest.raises(qflare.AttestationRefused, match="mode not permitted"):
        device.wait_for_round(timeout=60)
    # A policy with a mistake is named at once.
    with pytest.raises(ValueError, match="hardware_policy"):
        qflare.Client(str(tmp_path / "d"), enclave_measurements=[],
                      hardware_policy={"nitro": {"pcr0": ["ab" * 48], "debug": True}})


def test_a_revoked_device_and_a_wrong_server_key_are_named(start_server, tmp_path):
    server = start_server(architecture="custom", auto_start=True)
    device_id = server.enroll(tmp_path / "d")
    server.admin("device", "revoke", device_id)
    client = qflare.Client(str(tmp_path / "d"), enclave_measurements=[server.measurement],
                           allow_software_attestation=True)
    with pytest.raises(qflare.DeviceRevoked):
        client.wait_for_round(timeout=10)
    wrong = "0" * len(server.fingerprint)
    with pytest.raises(qflare.ServerKeyMismatch):
        qflare.enroll(server.url, server.token(), wrong, str(tmp_path / "other"))
    with pytest.raises(qflare.EnrollmentRefused):
        qflare.enroll(server.url, "A" * 43, server.fingerprint, str(tmp_path / "third"))


def test_a_device_moves_to_its_other_server_address(start_server, tmp_path):
    import json

    server = start_server(
        architecture="custom", auto_start=True, clients_per_round=1, min_updates=1,
        max_rounds=1, round_timeout_secs=60, poll_interval_secs=1,
    )
    safetensors.numpy.save_file(SoftmaxDevice.initial(), str(tmp_path / "m.safetensors"))
    server.admin("model", "init", "--from", str(tmp_path / "m.safetensors"), "--name", "softmax")
    # An address the device could never use is refused before anything is sent.
    with pytest.raises(qflare.QflareError, match="not an https:// URL"):
        qflare.enroll(server.url, server.token(), server.fingerprint, str(tmp_path / "bad"),
                      also_servers=["http://127.0.0.1:1"])
    qflare.enroll(server.url, server.token(), server.fingerprint, str(tmp_path / "d"),
                  also_servers=[server.url])
    # The replica the device enrolled through goes away: its first address
    # now refuses connections, and the same server answers at the other.
    identity = tmp_path / "d" / "identity.json"
    document = json.loads(identity.read_text())
    assert document["alternate_urls"] == [server.url]
    document["server_url"] = f"https://127.0.0.1:{free_port()}"
    identity.write_text(json.dumps(document))
    summary = qflare.run_device(
        lambda weights, config: (weights, 10, {}),
        identity_dir=str(tmp_path / "d"),
        enclave_measurements=[server.measurement],
        allow_software_attestation=True,
    )
    assert [r["round_id"] for r in summary["rounds"]] == [1], summary


def test_ctrl_c_stops_a_waiting_device_cleanly(start_server, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    # No model is registered, so the device waits for a round until interrupted.
    server = start_server(architecture="custom", auto_start=True)
    server.enroll(tmp_path / "d")
    script = (
        "import sys, qflare\n"
        "try:\n"
        "    qflare.run_device(lambda w, c: (w, 1, {}), identity_dir=sys.argv[1],\n"
        "                      enclave_measurements=[sys.argv[2]], allow_software_attestation=True)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "    sys.exit(130)\n"
    )
    # Python turns SIGINT into KeyboardInterrupt only if its parent left
    # SIGINT at the default; a test runner started in the background by a
    # shell inherits it ignored, so the device gets the default back.
    device = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "d"), server.measurement],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(3)  # the device is polling: a session is open, a poll is scheduled
    assert device.poll() is None, device.communicate()
    started = time.monotonic()
    device.send_signal(signal.SIGINT)
    out, err = device.communicate(timeout=30)
    assert device.returncode == 130, (out, err)
    assert "interrupted" in out
    assert time.monotonic() - started < 5, "Ctrl-C is honoured within the 100 ms check, not at the next poll"
