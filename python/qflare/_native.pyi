"""Type stubs of the Rust extension module (see ``python/src/lib.rs``)."""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__version__: str

class QflareError(Exception): ...
class ServerUnreachable(QflareError): ...
class ServerKeyMismatch(QflareError): ...
class EnrollmentRefused(QflareError): ...
class DeviceRevoked(QflareError): ...
class AttestationRefused(QflareError): ...
class ModelRefused(QflareError): ...
class ShapeMismatch(QflareError): ...
class NonFiniteUpdate(QflareError): ...
class RoundRefused(QflareError): ...

class Round:
    round_id: int
    model_version: int
    model: str
    config: Dict[str, Any]
    def model_bytes(self) -> bytes: ...

class Client:
    device_id: str
    def __init__(
        self,
        identity_dir: str,
        *,
        enclave_measurements: List[str],
        allow_software_attestation: bool = False,
        max_report_age_secs: int = 300,
        allow_unsandboxed_enclave: bool = False,
        hardware_policy: Optional[str] = None,
    ) -> None: ...
    def wait_for_round(self, timeout_secs: Optional[float] = None) -> Optional[Round]: ...
    def submit(self, round: Round, weights: bytes, examples: int) -> Dict[str, Any]: ...
    def evaluate(self, round: Round, examples: int, metrics: Dict[str, float]) -> None: ...

def enroll(
    server: str,
    token: str,
    server_key: str,
    identity_dir: str,
    name: Optional[str] = None,
    kem: Optional[str] = None,
    signature: Optional[str] = None,
    also_servers: Sequence[str] = (),
) -> str: ...
def run_device(
    identity_dir: str,
    fit: Callable[[bytes, Dict[str, Any]], Tuple[bytes, int, Dict[str, float]]],
    evaluate: Optional[Callable[[bytes, Dict[str, Any]], Optional[Tuple[int, Dict[str, float]]]]] = None,
    *,
    enclave_measurements: List[str],
    allow_software_attestation: bool = False,
    max_rounds: Optional[int] = None,
    max_report_age_secs: int = 300,
    max_local_epochs: int = 50,
    stop_when_finished: bool = True,
    allow_unsandboxed_enclave: bool = False,
    hardware_policy: Optional[str] = None,
) -> Dict[str, Any]: ...
