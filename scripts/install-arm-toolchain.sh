#!/usr/bin/env bash
# Optional toolchain for the embedded eGRU's device checks (Debian/Ubuntu): the Arm bare-metal
# cross-compiler with its C library, and QEMU's Arm system emulator. Tests that need them skip
# when they are missing; CI does not install them.
set -euo pipefail
packages=(gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm)
if [ "$(id -u)" -eq 0 ]; then sudo=(); else sudo=(sudo); fi
"${sudo[@]}" apt-get update
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "${packages[@]}"
arm-none-eabi-gcc --version | head -1
qemu-system-arm --version | head -1
