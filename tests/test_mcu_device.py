"""The exported C built for a Cortex-M0+ and run on QEMU's emulated Cortex-M0 board: the same
test vectors, zero mismatches; instruction counts that follow the steps run. Skipped without
the Arm toolchain and QEMU (scripts/install-arm-toolchain.sh installs them)."""

from __future__ import annotations

import numpy as np
import pytest

from egru.mcu import device, export_c, write_test_vectors

from test_mcu_export import make_engine

pytestmark = pytest.mark.skipif(not device.available(),
                                reason="no arm-none-eabi-gcc or qemu-system-arm: run scripts/install-arm-toolchain.sh")


def test_test_vectors_on_the_emulated_cortex_m0(tmp_path):
    engine = make_engine("paper", I=5, H=[9, 6], head=[6, 4], seed=2)
    rng = np.random.default_rng(5)
    inputs = np.concatenate([rng.integers(-32768, 32768, size=(6, 10, 5)),
                             rng.choice([-32768, 32767], size=(2, 10, 5))])
    export_c(engine, tmp_path, "kws")
    write_test_vectors(engine, inputs, tmp_path, "kws")
    elf = device.build([tmp_path / "kws.c", tmp_path / "kws_check.c"], tmp_path / "check.elf")
    status, printed = device.run(elf, timeout=60)
    assert status == 0 and "mismatches: 0 of 80 values" in printed, printed  # 8 × (6 + 4)
    classes = [int(line.split()[-1]) for line in printed.splitlines() if line.startswith("sequence")]
    assert classes == engine.classify(inputs.transpose(1, 0, 2)).tolist()
    sizes = device.size(elf)
    assert sizes["text"] > 0 and sizes["bss"] >= 0


def test_a_wrong_expectation_fails_on_the_device(tmp_path):
    engine = make_engine("paper", I=3, H=[4], head=[2], seed=1)
    inputs = np.random.default_rng(0).integers(-32768, 32768, size=(2, 5, 3))
    export_c(engine, tmp_path, "kws")
    paths = write_test_vectors(engine, inputs, tmp_path, "kws")
    text = paths["vectors"].read_text()
    start = text.index("kws_expected_logits")
    value_at = text.index("{", start) + 6
    paths["vectors"].write_text(text[:value_at] + "1" + text[value_at:])  # one digit more in a logit
    elf = device.build([tmp_path / "kws.c", paths["check"]], tmp_path / "check.elf")
    status, printed = device.run(elf, timeout=60)
    assert status == 1 and "mismatches: 1 of" in printed, printed


def test_instruction_counts_follow_the_steps(tmp_path):
    engine = make_engine("paper", I=4, H=[5], seed=3)
    export_c(engine, tmp_path, "m")
    (tmp_path / "main.c").write_text("""#include "m.h"
static const int16_t x[M_INPUT] = {1000, -2000, 3000, 32767};
int main(void) { int16_t state[M_STATE]; int t;
    m_reset(state); for (t = 0; t < STEPS; t++) m_step(x, state); return state[0] == 12345; }
""")
    counts = [device.count_instructions(device.build([tmp_path / "m.c", tmp_path / "main.c"],
                                                     tmp_path / f"s{n}.elf", {"STEPS": n}))
              for n in (0, 1, 3)]
    per_step = counts[1] - counts[0]
    assert per_step > 5 * 2 * 9  # at least a few instructions per weight of the 2 · 5 · 9
    assert abs((counts[2] - counts[0]) - 3 * per_step) <= 0.1 * per_step  # about linear


def test_initialised_data_after_code_of_any_length(tmp_path):
    """The startup copies .data from flash word by word, which a Cortex-M0 cannot do from an
    address that is not a multiple of 4: the linker script must align the image however long
    the code and constants before it are (here they end on an odd byte)."""
    source = tmp_path / "data.c"
    source.write_text("""static volatile int value = 7;
static const char odd[3] = {1, 2, 3};
int main(void) { return value + odd[value % 3] - 9; }
""")
    elf = device.build([source], tmp_path / "data.elf")
    assert device.run(elf, timeout=60) == (0, "")
