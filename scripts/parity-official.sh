#!/usr/bin/env bash
# Run the official FedHPro code (a checkout you bring; never copied into this repository) beside ours on
# the same CIFAR-10 files, partition and hyperparameters, and print per-round accuracy and seconds per
# round of both (see fedhpro/parity.py):
#   scripts/parity-official.sh OFFICIAL_CHECKOUT [--rounds 8] [--local-epochs 1] [--seeds 3]
#                              [--device cpu|cuda] [--cifar PATH] [--out results/parity]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m fedhpro.parity "$@"
