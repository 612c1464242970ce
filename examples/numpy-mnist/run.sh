#!/usr/bin/env bash
# Three NumPy devices federate softmax regression on MNIST; the result is
# exported with its enclave certificate and verified.
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../common.sh"

write_config 5 0.5 32 1
start_server
python3 -c 'import numpy as np, safetensors.numpy as s, sys; s.save_file({"linear.weight": np.zeros((10, 784), np.float32), "linear.bias": np.zeros(10, np.float32)}, sys.argv[1])' "$work/initial.safetensors"
qflare model init --from "$work/initial.safetensors" --name mnist-softmax
for k in 0 1 2; do enroll "$work/device$k"; done
for k in 0 1 2; do python3 "$here/device.py" "$work/device$k" "$k" & pids+=($!); done
wait "${pids[@]:1}"
qflare round status
qflare model export --out "$here/global.safetensors"
qflare model verify "$here/global.safetensors"
