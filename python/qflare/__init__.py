"""QFLARE device SDK: federated learning with post-quantum security, from Python.

Everything that makes a device trustworthy runs in Rust (the ``_native``
module, QFLARE's edge library): enrollment, the pinned post-quantum TLS and
session, verification of the enclave's attestation and of every global
model's certificate, signing and sealing each update to the enclave. This
package only moves tensors between that code and your training code, as
``dict[str, numpy.ndarray]`` (see :mod:`qflare.torch` for PyTorch).

Port a Flower ``NumPyClient`` by keeping its ``fit`` and ``evaluate``::

    def fit(weights, config):
        ...train...
        return new_weights, num_examples, {"accuracy": acc}

    def evaluate(weights, config):
        ...
        return loss, num_examples, {"accuracy": acc}

    qflare.run_device(fit=fit, evaluate=evaluate, identity_dir="device1",
                      enclave_measurements=[MEASUREMENT], allow_software_attestation=True)
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
import safetensors.numpy

from . import _native
from ._native import (
    AttestationRefused,
    DeviceRevoked,
    EnrollmentRefused,
    ModelRefused,
    NonFiniteUpdate,
    QflareError,
    RoundRefused,
    ServerKeyMismatch,
    ServerUnreachable,
    ShapeMismatch,
)

__version__ = _native.__version__

Weights = Dict[str, np.ndarray]
Config = Dict[str, Any]
FitFn = Callable[[Weights, Config], Tuple[Mapping[str, Any], int, Mapping[str, float]]]
EvaluateFn = Callable[[Weights, Config], Optional[Tuple[float, int, Mapping[str, float]]]]

__all__ = [
    "AttestationRefused",
    "Client",
    "Round",
    "DeviceRevoked",
    "EnrollmentRefused",
    "ModelRefused",
    "NonFiniteUpdate",
    "QflareError",
    "RoundRefused",
    "ServerKeyMismatch",
    "ServerUnreachable",
    "ShapeMismatch",
    "decode_weights",
    "encode_weights",
    "enroll",
    "run_device",
]


def decode_weights(data: bytes) -> Weights:
    """A safetensors file's tensors as NumPy arrays (float32 for the global model)."""
    return dict(safetensors.numpy.load(data))


def _policy_json(policy: Optional[Mapping[str, Any]]) -> Optional[str]:
    """A hardware policy as the JSON the native layer parses (and checks)."""
    return None if policy is None else json.dumps(dict(policy))


def encode_weights(weights: Mapping[str, Any]) -> bytes:
    """Weights as a safetensors file of float32 tensors.

    Floating arrays of any precision are converted to float32, the precision
    the enclave aggregates in; anything else array-like is converted too.
    """
    arrays = {}
    for name, value in weights.items():
        array = np.asarray(value)
        arrays[name] = np.ascontiguousarray(array, dtype=np.float32)
    return safetensors.numpy.save(arrays)


def enroll(
    server: str,
    token: str,
    server_key: str,
    identity_dir: str,
    *,
    name: Optional[str] = None,
    kem: Optional[str] = None,
    signature: Optional[str] = None,
    also_servers: Iterable[str] = (),
) -> str:
    """Enrolls this device with a single-use token and returns its device id.

    ``server_key`` is the server fingerprint the admin hands out with the
    token; the device's private keys are generated here and written,
    owner-only, into ``identity_dir`` (which must not hold an identity yet).
    ``also_servers`` are other replicas of the same server (``https://``
    addresses): when the one in use cannot be reached, the device moves to
    the next.
    """
    return _native.enroll(
        server, token, server_key, str(identity_dir), name, kem, signature, list(also_servers)
    )


def run_device(
    fit: FitFn,
    evaluate: Optional[EvaluateFn] = None,
    *,
    identity_dir: str,
    enclave_measurements: Iterable[str],
    allow_software_attestation: bool = False,
    max_rounds: Optional[int] = None,
    max_report_age_secs: int = 300,
    max_local_epochs: int = 50,
    stop_when_finished: bool = True,
    allow_unsandboxed_enclave: bool = False,
    hardware_policy: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Takes part in federated training until the server finishes.

    ``fit(weights, config)`` trains from the verified global model and
    returns ``(new_weights, num_examples, metrics)``; ``config`` holds the
    round's ``learning_rate``, ``batch_size``, ``epochs``, ``seed``,
    ``round_id``, ``model_version`` and ``model`` (its name). The new
    weights must have the global model's names and shapes
    (:class:`ShapeMismatch` otherwise) and finite values
    (:class:`NonFiniteUpdate`).

    ``evaluate(weights, config)``, when given, evaluates the round's global
    model on local held-out data before training and returns ``(loss,
    num_examples, metrics)`` (or ``None`` to skip); the server aggregates
    these weighted by examples (federated evaluation).

    Only enclaves whose measurement is in ``enclave_measurements`` are
    trusted; ``allow_software_attestation`` accepts a software-mode enclave
    (development only); ``allow_unsandboxed_enclave`` accepts one whose
    signed report says its system-call sandbox is off (refused by default).
    ``hardware_policy`` accepts enclaves in AMD SEV-SNP, Intel TDX or AWS
    Nitro Enclaves on its terms (a dict as the ``qflare-edge
    --hardware-policy`` JSON file: per kind, the measurement allow-list and
    minimum security versions); their evidence is verified offline.
    Returns a summary of the rounds this device took
    part in. Ctrl-C stops it and raises ``KeyboardInterrupt``.
    """

    def native_fit(model: bytes, config: Config) -> Tuple[bytes, int, Dict[str, float]]:
        result = fit(decode_weights(model), dict(config))
        if not (isinstance(result, tuple) and len(result) == 3):
            raise TypeError("fit must return (weights, num_examples, metrics)")
        weights, examples, metrics = result
        return (
            encode_weights(weights),
            int(examples),
            {str(k): float(v) for k, v in dict(metrics or {}).items()},
        )

    native_evaluate = None
    if evaluate is not None:

        def native_evaluate(model: bytes, config: Config) -> Optional[Tuple[int, Dict[str, float]]]:
            result = evaluate(decode_weights(model), dict(config))
            if result is None:
                return None
            if not (isinstance(result, tuple) and len(result) == 3):
                raise TypeError("evaluate must return (loss, num_examples, metrics) or None")
            loss, examples, metrics = result
            reported = {str(k): float(v) for k, v in dict(metrics or {}).items()}
            reported["loss"] = float(loss)
            return int(examples), reported

    return _native.run_device(
        str(identity_dir),
        native_fit,
        native_evaluate,
        enclave_measurements=list(enclave_measurements),
        allow_software_attestation=allow_software_attestation,
        max_rounds=max_rounds,
        max_report_age_secs=max_report_age_secs,
        max_local_epochs=max_local_epochs,
        stop_when_finished=stop_when_finished,
        allow_unsandboxed_enclave=allow_unsandboxed_enclave,
        hardware_policy=_policy_json(hardware_policy),
    )


class Round:
    """A round that selected this device, with its verified global model."""

    def __init__(self, native: "_native.Round"):
        self._native = native
        self._weights: Optional[Weights] = None

    @property
    def round_id(self) -> int:
        return self._native.round_id

    @property
    def model_version(self) -> int:
        return self._native.model_version

    @property
    def model(self) -> str:
        """The model's name."""
        return self._native.model

    @property
    def config(self) -> Config:
        """The round's ``learning_rate``, ``batch_size``, ``epochs``, ``deadline``, ..."""
        return dict(self._native.config)

    @property
    def weights(self) -> Weights:
        """The verified global model (float32 arrays; a fresh copy each round)."""
        if self._weights is None:
            self._weights = decode_weights(self._native.model_bytes())
        return {name: array.copy() for name, array in self._weights.items()}

    def __repr__(self) -> str:
        return repr(self._native)


class Client:
    """The device's steps one call at a time, for training loops of your own.

    Every check of :func:`run_device` applies: a round is returned only after
    the enclave's fresh attestation and the model's certificate verified, and
    an update is sealed only after its tensors matched the global model.
    Retrying is yours: :class:`ServerUnreachable` and a 429/503
    :class:`QflareError` are worth retrying.

    ::

        client = qflare.Client("identity/", enclave_measurements=[M])
        while (round := client.wait_for_round()) is not None:
            loss, n_test, metrics = my_evaluate(round.weights)
            client.evaluate(round, n_test, {"loss": loss, **metrics})
            new_weights, n = my_fit(round.weights, round.config)
            client.submit(round, new_weights, n)
    """

    def __init__(
        self,
        identity_dir: str,
        *,
        enclave_measurements: Iterable[str],
        allow_software_attestation: bool = False,
        max_report_age_secs: int = 300,
        allow_unsandboxed_enclave: bool = False,
        hardware_policy: Optional[Mapping[str, Any]] = None,
    ):
        self._native = _native.Client(
            str(identity_dir),
            enclave_measurements=list(enclave_measurements),
            allow_software_attestation=allow_software_attestation,
            max_report_age_secs=max_report_age_secs,
            allow_unsandboxed_enclave=allow_unsandboxed_enclave,
            hardware_policy=_policy_json(hardware_policy),
        )

    @property
    def device_id(self) -> str:
        return self._native.device_id

    def wait_for_round(self, timeout: Optional[float] = None) -> Optional[Round]:
        """Waits for a round that selects this device; ``None`` once training
        has finished. Raises ``TimeoutError`` after ``timeout`` seconds."""
        native = self._native.wait_for_round(timeout)
        return None if native is None else Round(native)

    def submit(self, round: Round, weights: Mapping[str, Any], num_examples: int) -> Dict[str, Any]:
        """Seals the update (``weights`` minus the round's global model) to the
        attested enclave and submits it; returns the receipt (``status`` is
        ``accepted``, ``pending`` or ``rejected``, ``code`` the enclave's reason)."""
        return self._native.submit(round._native, encode_weights(weights), int(num_examples))

    def evaluate(self, round: Round, num_examples: int, metrics: Mapping[str, float]) -> None:
        """Reports this device's evaluation of the round's global model on its
        held-out data; the server aggregates reports weighted by examples."""
        self._native.evaluate(
            round._native, int(num_examples), {str(k): float(v) for k, v in metrics.items()}
        )
