"""The exported C on an emulated Arm Cortex-M0: build, size, run, count instructions.

Optional, for users with the Arm bare-metal toolchain and QEMU (on Debian or Ubuntu,
``scripts/install-arm-toolchain.sh`` installs ``gcc-arm-none-eabi`` and ``qemu-system-arm``).
Programs are built for ``-mcpu=cortex-m0plus`` (ARMv6-M, Thumb), without any C library, with
the startup code and memory map below, and run on QEMU's ``microbit`` board (nRF51822: a
Cortex-M0, 256 KiB flash, 16 KiB RAM; the M0+ runs the same instruction set). They print
through semihosting, and ``main``'s return value becomes QEMU's exit status.

``count_instructions`` runs QEMU with one instruction per translation block and counts the
blocks executed: exact counts of instructions, not cycles (an M0+ takes one or two cycles for
most, more for loads, branches and the software division).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

GCC, SIZE, QEMU = "arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm"
MARK = b"Trace "  # how QEMU's log begins the line of each translation block executed
CPU = "cortex-m0plus"
BOARD = "microbit"
FLAGS = (f"-mcpu={CPU}", "-mthumb", "-std=c99", "-Wall", "-Wextra", "-Werror", "-ffreestanding",
         "-ffunction-sections", "-fdata-sections", "-Wl,--gc-sections", "-nostdlib")

STARTUP = r"""/* Startup for a Cortex-M0 without a C library: copy .data, clear .bss, run main, exit with
   its value through semihosting (which also prints). */
#include <stdint.h>
extern uint32_t __data_load, __data_start, __data_end, __bss_start, __bss_end, __stack_top;
int main(void);

static int semihost(int operation, const void *argument) {
    register int r0 __asm__("r0") = operation;
    register const void *r1 __asm__("r1") = argument;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

void device_print(const char *text) { semihost(0x04, text); } /* SYS_WRITE0 */

void device_exit(int code) {
    static uint32_t block[2];
    block[0] = 0x20026u; /* ADP_Stopped_ApplicationExit */
    block[1] = (uint32_t)code;
    semihost(0x20, block); /* SYS_EXIT_EXTENDED */
    for (;;) {}
}

void reset_handler(void) {
    uint32_t *source = &__data_load, *target = &__data_start;
    while (target < &__data_end) *target++ = *source++;
    for (target = &__bss_start; target < &__bss_end;) *target++ = 0;
    device_exit(main());
}

static void fault(void) { device_print("hard fault\n"); device_exit(99); }

__attribute__((section(".vectors"), used)) static const void *const vectors[4] = {
    &__stack_top, (const void *)reset_handler, (const void *)fault, (const void *)fault};
"""

LINKER_SCRIPT = """MEMORY {
    FLASH (rx) : ORIGIN = 0x00000000, LENGTH = 256K
    RAM (rwx)  : ORIGIN = 0x20000000, LENGTH = 16K
}
SECTIONS {
    .text : { KEEP(*(.vectors)) *(.text*) *(.rodata*) . = ALIGN(4); } > FLASH /* .data's image: word-aligned for the copy */
    .data : { __data_start = .; *(.data*) . = ALIGN(4); __data_end = .; } > RAM AT > FLASH
    __data_load = LOADADDR(.data);
    .bss (NOLOAD) : { __bss_start = .; *(.bss*) *(COMMON) . = ALIGN(4); __bss_end = .; } > RAM
    __stack_top = ORIGIN(RAM) + LENGTH(RAM);
}
"""


def available() -> bool:
    """Whether the cross-compiler and QEMU are on PATH."""
    return all(shutil.which(tool) for tool in (GCC, SIZE, QEMU))


def _require() -> None:
    missing = [tool for tool in (GCC, SIZE, QEMU) if not shutil.which(tool)]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not found: run scripts/install-arm-toolchain.sh "
                           "(Debian/Ubuntu) or install the Arm GNU toolchain and QEMU")


def build(sources, out, defines: dict | None = None, optimize: str = "-Os", libraries=("-lgcc",)) -> Path:
    """Compile and link C ``sources`` with the startup code into the ELF file ``out``."""
    _require()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / "startup.c").write_text(STARTUP)
    (out.parent / "device.ld").write_text(LINKER_SCRIPT)
    command = [GCC, *FLAGS, optimize, "-DEGRU_DEVICE", *(f"-D{k}={v}" for k, v in (defines or {}).items()),
               "-T", str(out.parent / "device.ld"), "-o", str(out), str(out.parent / "startup.c"),
               *map(str, sources), *libraries]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{GCC} failed:\n{done.stderr}")
    return out


def size(elf) -> dict:
    """``{"text", "data", "bss"}`` bytes of an ELF file: flash holds text and data, RAM data
    and bss."""
    _require()
    lines = subprocess.run([SIZE, str(elf)], check=True, capture_output=True, text=True).stdout.splitlines()
    text, data, bss = (int(v) for v in lines[1].split()[:3])
    return {"text": text, "data": data, "bss": bss}


def _qemu(elf, *extra, timeout: float) -> subprocess.CompletedProcess:
    _require()
    return subprocess.run([QEMU, "-M", BOARD, "-nographic", "-monitor", "none", "-semihosting", *extra,
                           "-kernel", str(elf)], capture_output=True, text=True, timeout=timeout)


def run(elf, timeout: float = 120) -> tuple:
    """Run an ELF file on the emulated board: ``(exit status, what it printed)``."""
    done = _qemu(elf, timeout=timeout)
    return done.returncode, done.stdout + done.stderr  # semihosting writes to stderr


def count_instructions(elf, timeout: float = 300) -> int:
    """The instructions the program executes from reset to exit."""
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "trace.log"
        done = _qemu(elf, "-singlestep", "-d", "exec,nochain", "-D", str(log), timeout=timeout)
        if done.returncode not in (0, 1):
            raise RuntimeError(f"the program failed under QEMU ({done.returncode}): {(done.stdout + done.stderr)[-500:]}")
        count, tail = 0, b""
        with open(log, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                data = tail + chunk  # a line cut by the chunk's edge is counted once, in the next
                count += data.count(MARK)
                tail = data[-(len(MARK) - 1):]
        return count
