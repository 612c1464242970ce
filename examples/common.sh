# Shared by the examples' run.sh: start a QFLARE server for a custom model in
# a scratch directory, register the model, enroll devices, stop it all on exit.
# Needs `qflare` and `qflare-enclave` on PATH (or QFLARE_BIN_DIR) and the
# `qflare` Python package installed (pip install ./python).
set -euo pipefail

bin_dir="${QFLARE_BIN_DIR:-$(dirname "$(command -v qflare)")}"
work="$(mktemp -d)"
port="${QFLARE_EXAMPLE_PORT:-18443}"
config="$work/qflare.yaml"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# write_config ROUNDS LEARNING_RATE BATCH EPOCHS
write_config() {
  cat > "$config" <<YAML
server:
  listen: 127.0.0.1:$port
  metrics_listen: null
  state_dir: $work/state
enclave:
  command: $bin_dir/qflare-enclave
  # No TEE on a laptop: the enclave is a hardened process.
  allow_software_mode: true
federation:
  architecture: custom
  auto_start: true
  clients_per_round: 3
  min_updates: 3
  max_rounds: $1
  poll_interval_secs: 1
  training: { learning_rate: $2, batch_size: $3, epochs: $4 }
YAML
}

qflare() { "$bin_dir/qflare" --config "$config" "$@"; }

start_server() {
  # The binary itself in the background (not the wrapper function, whose
  # subshell would be what `kill` reaches at exit).
  "$bin_dir/qflare" --config "$config" server > "$work/server.out" 2> "$work/server.log" &
  pids+=($!)
  until grep -q -A1 "server fingerprint" "$work/server.out" 2>/dev/null; do
    if ! kill -0 "${pids[0]}" 2>/dev/null; then
      echo "the server did not start (port $port taken?):" >&2
      tail -5 "$work/server.log" >&2
      exit 1
    fi
    sleep 0.2
  done
  fingerprint="$(grep -A1 "server fingerprint" "$work/server.out" | tail -1)"
  measurement="$(sha384sum "$bin_dir/qflare-enclave" | cut -d' ' -f1)"
  export QFLARE_SERVER="https://127.0.0.1:$port" QFLARE_SERVER_KEY="$fingerprint" \
    QFLARE_ENCLAVE_MEASUREMENT="$measurement"
}

# enroll DIR: a device identity in DIR, from a fresh one-time token.
enroll() {
  token="$(qflare token create --label "$(basename "$1")" | tail -1)"
  python3 -c 'import os, sys, qflare; qflare.enroll(os.environ["QFLARE_SERVER"], sys.argv[1], os.environ["QFLARE_SERVER_KEY"], sys.argv[2])' "$token" "$1"
}
