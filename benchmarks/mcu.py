"""The embedded eGRU on spoken digits (FSDD): accuracy in float, through the Q15 engine and
through the exported C; model bytes; operations per step; and, with the Arm toolchain and QEMU
(scripts/install-arm-toolchain.sh), the build for a Cortex-M0+, its test vectors on the
emulated board and instructions per step next to a float32 GRU's.

    python benchmarks/mcu.py --runs RUNS --out docs/mcu.json

RUNS holds runs of ``egru train classify --task fsdd --layer-sizes 30,20 --head-size 16``
named ``gru``, ``float`` (--model embedded), ``qat`` and ``qat-scratch`` (quantisation-aware);
those missing are left out (see docs/mcu.md for the commands).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from egru.mcu import device, export_c, q15, write_test_vectors
from egru.recipes import classify

ROOT = Path(__file__).resolve().parent
RUNS = ("gru", "float", "qat", "qat-scratch")
DEVICE_VECTORS = 20  # test sequences checked on the emulated board (its flash holds the vectors)
COUNTED_STEPS = 4  # steps whose instructions are counted (the difference to a run of none)


def host_c(engine, inputs: np.ndarray, folder: Path) -> tuple:
    """Export, write ``inputs`` as test vectors, compile and run the check program on this
    machine: (mismatches, classes)."""
    export_c(engine, folder, "kws")
    write_test_vectors(engine, inputs, folder, "kws")
    cc = shutil.which("cc") or shutil.which("gcc")
    binary = folder / "check"
    subprocess.run([cc, "-std=c99", "-O2", "-o", str(binary), str(folder / "kws.c"), str(folder / "kws_check.c")],
                   check=True)
    out = subprocess.run([str(binary)], capture_output=True, text=True).stdout.splitlines()
    classes = [int(line.split()[-1]) for line in out if line.startswith("sequence")]
    return int(out[-1].split()[1]), np.array(classes)


def operations(engine) -> dict:
    """Integer operations of one step of the recurrent layers: a shift and an add per nonzero
    3-bit weight, one division per unit and gate (softsign)."""
    nonzero = sum(int(np.count_nonzero(c[0]) + np.count_nonzero(c[2])) for c in engine.recurrent.cells)
    weights = sum(c[0].size + c[2].size for c in engine.recurrent.cells)
    return {"shift_adds": nonzero, "weights": weights, "divisions": 2 * sum(engine.recurrent.hidden_sizes)}


def gru_numbers(model) -> dict:
    recurrent = sum(p.numel() for layer in model.layers for p in layer.parameters())
    head = sum(p.numel() for p in model.readout.parameters())
    macs = sum(3 * layer.rnn.hidden_size * (layer.rnn.input_size + layer.rnn.hidden_size) for layer in model.layers)
    return {"float32_bytes": 4 * (recurrent + head), "float32_recurrent_bytes": 4 * recurrent, "macs_per_step": macs,
            "nonlinearities_per_step": sum(3 * layer.rnn.hidden_size for layer in model.layers)}


def steps_program(engine, frames: np.ndarray, folder: Path) -> Path:
    """A main that runs -DSTEPS steps of ``frames`` (Q15, (K, I)) through the exported model."""
    values = ",\n    ".join("{" + ", ".join(str(int(v)) for v in frame) + "}" for frame in frames)
    source = folder / "steps.c"
    source.write_text(f"""#include "kws.h"
static const int16_t frames[{len(frames)}][KWS_INPUT] = {{
    {values}}};
int main(void) {{
    int16_t state[KWS_STATE];
    int32_t logits[KWS_CLASSES];
    int t;
    kws_reset(state);
    for (t = 0; t < STEPS; t++) kws_step(frames[t], state);
    return kws_classify(state, logits) > 99;
}}
""")
    return source


def on_device(engine, inputs: np.ndarray, gru_sizes: tuple, folder: Path) -> dict:
    """Build for the Cortex-M0+, check the test vectors under QEMU, count instructions."""
    export_c(engine, folder, "kws")
    write_test_vectors(engine, inputs[:DEVICE_VECTORS + 2], folder, "kws")
    elf = device.build([folder / "kws.c", folder / "kws_check.c"], folder / "check.elf")
    status, printed = device.run(elf)
    report = {"check_exit_status": status, "check": printed.strip().splitlines()[-1]}
    frames = inputs[0, -COUNTED_STEPS:]
    source = steps_program(engine, frames, folder)
    counts = {}
    for steps in (0, COUNTED_STEPS):
        elf = device.build([folder / "kws.c", source], folder / f"steps{steps}.elf", {"STEPS": steps})
        counts[steps] = device.count_instructions(elf)
    report["egru_program"] = device.size(folder / f"steps{COUNTED_STEPS}.elf")
    report["egru_instructions_per_step"] = (counts[COUNTED_STEPS] - counts[0]) / COUNTED_STEPS
    # the float32 GRU of the same sizes, its weights in flash
    I, H0, H1 = gru_sizes
    rng = np.random.default_rng(0)
    arrays = {"w_ih0": 3 * H0 * I, "w_hh0": 3 * H0 * H0, "b0": 6 * H0, "w_ih1": 3 * H1 * H0,
              "w_hh1": 3 * H1 * H1, "b1": 6 * H1, "x": I}
    header = [f"#define INPUT {I}\n#define HIDDEN0 {H0}\n#define HIDDEN1 {H1}\n"]
    for name, n in arrays.items():
        values = ", ".join(f"{v:.6f}f" for v in rng.uniform(-0.25, 0.25, n))
        header.append(f"static const float {name}[{n}] = {{{values}}};\n")
    (folder / "float_gru_weights.h").write_text("".join(header))
    counts = {}
    for steps in (0, COUNTED_STEPS):
        elf = device.build([ROOT / "mcu" / "float_gru.c"], folder / f"gru{steps}.elf", {"STEPS": steps},
                           libraries=(f"-I{folder}", "-lm", "-lc", "-lgcc"))
        counts[steps] = device.count_instructions(elf)
    report["gru_program"] = device.size(folder / f"gru{COUNTED_STEPS}.elf")
    report["gru_instructions_per_step"] = (counts[COUNTED_STEPS] - counts[0]) / COUNTED_STEPS
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    x, y = classify.load_fsdd_task(args.data_dir).splits["test"]
    inputs = q15.to_q15(x.numpy())  # (N, T, I)
    labels = y.numpy()
    results = {"test_sequences": len(labels), "runs": {}}
    for name in RUNS:
        checkpoint = args.runs / name / "best.pt"
        if not checkpoint.is_file():
            continue
        model = classify.load_classifier(checkpoint)
        with torch.no_grad():
            float_classes = model(x.transpose(0, 1))[0].argmax(-1).numpy()
        entry = {"config": json.loads((args.runs / name / "results.json").read_text())["config"],
                 "float_accuracy": float((float_classes == labels).mean())}
        if entry["config"]["model"] == "embedded":
            engine = classify.to_q15(model)
            q_classes = engine.classify(inputs.transpose(1, 0, 2))
            entry["q15_accuracy"] = float((q_classes == labels).mean())
            with tempfile.TemporaryDirectory() as scratch:
                mismatches, c_classes = host_c(engine, inputs, Path(scratch))
                entry["stored_bytes"] = export_c(engine, scratch, "kws")["stored_bytes"]
            entry["c_mismatches"] = mismatches
            entry["c_accuracy"] = float((c_classes[:len(labels)] == labels).mean())
            entry["c_equals_q15_classes"] = bool(np.array_equal(c_classes[:len(labels)], q_classes))
            entry["operations_per_step"] = operations(engine)
            if device.available() and name == "qat":
                with tempfile.TemporaryDirectory() as scratch:
                    sizes = (engine.recurrent.input_size, *engine.recurrent.hidden_sizes)
                    entry["cortex_m0"] = on_device(engine, inputs, sizes, Path(scratch))
        else:
            entry.update(gru_numbers(model))
        results["runs"][name] = entry
        print(name, json.dumps({k: v for k, v in entry.items() if k != "config"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
