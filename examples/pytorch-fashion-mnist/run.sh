#!/usr/bin/env bash
# Three PyTorch devices federate a small CNN on Fashion-MNIST; the result is
# exported with its enclave certificate, verified, and loaded back into PyTorch.
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../common.sh"

write_config "${ROUNDS:-5}" 0.05 32 1
start_server
python3 "$here/device.py" --initial "$work/initial.safetensors"
qflare model init --from "$work/initial.safetensors" --name fashion-cnn
for k in 0 1 2; do enroll "$work/device$k"; done
for k in 0 1 2; do python3 "$here/device.py" "$work/device$k" "$k" & pids+=($!); done
wait "${pids[@]:1}"
qflare round status
qflare model export --out "$here/global.safetensors"
qflare model verify "$here/global.safetensors"
python3 "$here/device.py" --load "$here/global.safetensors"
