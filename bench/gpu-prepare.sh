#!/usr/bin/env bash
# Here (no GPU): build `lab --features cuda` with the CUDA 13.0 wheel recipe and stage what
# bench/gpu.sh needs in scratch/gpu/ (git-ignored; name it in the device call's `carry`):
# the binary, xz-compressed (it passes the 64 MiB a call may carry), and the peer scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash bench/setup-cuda-toolchain.sh)"
CARGO_TARGET_DIR=target-cuda cargo build --release --features cuda
mkdir -p scratch/gpu
git describe --always --dirty > scratch/gpu/COMMIT
xz -T0 -6 -c target-cuda/release/lab > scratch/gpu/lab.xz
if [[ -d ../shared/bench ]]; then cp ../shared/bench/peer_hf.py ../shared/bench/peer_hf_compiled.py scratch/gpu/; fi
ls -la scratch/gpu
