"""The embedded eGRU on spoken digits (FSDD): accuracy in float, through the Q15 engine and
through the exported C; model bytes; operations per step; and, with the Arm toolchain and QEMU
(scripts/install-arm-toolchain.sh), the build for a Cortex-M0+, its test vectors on the
emulated board and instructions per step next to a float32 GRU's.

    python benchmarks/mcu.py --runs RUNS --out docs/mcu.json

RUNS holds runs of ``egru train classify --task fsdd --layer-sizes 30,20 --head-size 16``
named ``gru``, ``float`` (--model embedded), ``qat`` (--quantize paper --q15-ranges) and
``qat-late`` (the same with --quantize-start 0.5); those missing are left out (docs/mcu.md has
the commands). The Cortex-M0 figures are of ``qat``.
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
RUNS = ("gru", "float", "qat", "qat-late")
DEVICE_VECTORS = 20  # test sequences checked on the emulated board (its flash holds the vectors)
COUNTED_STEPS = 4  # steps whose instructions are counted (the difference to a run of none)


def host_c(engine, inputs: np.ndarray, folder: Path, export=export_c, vectors=write_test_vectors,
           flags=()) -> tuple:
    """Export (by ``export``), write ``inputs`` as test vectors (by ``vectors``), compile (with
    ``flags``) and run the check program on this machine: (mismatches, classes)."""
    export(engine, folder, "kws")
    vectors(engine, inputs, folder, "kws")
    cc = shutil.which("cc") or shutil.which("gcc")
    binary = folder / "check"
    subprocess.run([cc, "-std=c99", "-O2", *flags, "-o", str(binary), str(folder / "kws.c"),
                    str(folder / "kws_check.c")], check=True)
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
static volatile int steps = STEPS; /* volatile: the same code for every count */
int main(void) {{
    int16_t state[KWS_STATE];
    int32_t logits[KWS_CLASSES];
    int t;
    kws_reset(state);
    for (t = 0; t < steps; t++) kws_step(frames[t], state);
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


LABELS = {"gru": "GRU (torch.nn.GRU), float32", "float": "embedded eGRU, float",
          "qat": "embedded eGRU, quantisation-aware",
          "qat-late": "embedded eGRU, float for half the steps, then quantisation-aware"}


def _percent(value) -> str:
    return "—" if value is None else f"{value:.1%}"


def markdown(results: dict) -> str:
    """The accuracy table and the size-and-cost table of docs/mcu.md."""
    runs = results["runs"]
    lines = [f"FSDD test set ({results['test_sequences']} recordings, official split), one run each:",
             "", "| model | float | Q15 engine (Python) | recordings the engine classifies unlike float "
             "| C on this machine | C = engine, values differing |",
             "|---|---|---|---|---|---|"]
    for name in RUNS:
        if name not in runs:
            continue
        r = runs[name]
        same = "—" if "c_mismatches" not in r else f"{'yes' if r['c_equals_q15_classes'] else 'no'}, {r['c_mismatches']}"
        lines.append(f"| {LABELS[name]} | {_percent(r['float_accuracy'])} | {_percent(r.get('q15_accuracy'))} | "
                     f"{r.get('q15_classes_unlike_float', '—')} | {_percent(r.get('c_accuracy'))} | {same} |")
    if "gru" not in runs or "qat" not in runs:
        return "\n".join(lines) + "\n"
    gru, qat = runs["gru"], runs["qat"]
    ops = qat["operations_per_step"]
    lines += ["", "Size and cost of the recurrent layers 30 → 20 (and the head 16 → 10) per step:", "",
              "| | float32 GRU | embedded eGRU, Q15 | ratio |", "|---|---|---|---|",
              f"| model bytes (weights and biases) | {gru['float32_bytes']:,} | {qat['stored_bytes']:,} | "
              f"{gru['float32_bytes'] / qat['stored_bytes']:.1f}× |",
              f"| operations per step | {gru['macs_per_step']:,} float MACs, {gru['nonlinearities_per_step']} "
              f"sigmoid/tanh | {ops['shift_adds']:,} shift-adds (nonzero of {ops['weights']:,} weights), "
              f"{ops['divisions']} divisions | |"]
    device_run = qat.get("cortex_m0")
    if device_run:
        e, g = device_run["egru_program"], device_run["gru_program"]
        lines += [f"| Cortex-M0+ program flash (text + data; the GRU's with newlib's expf, tanhf and soft float) | "
                  f"{g['text'] + g['data']:,} | {e['text'] + e['data']:,} | "
                  f"{(g['text'] + g['data']) / (e['text'] + e['data']):.1f}× |",
                  f"| instructions per step (QEMU, emulated Cortex-M0) | {device_run['gru_instructions_per_step']:,.0f} | "
                  f"{device_run['egru_instructions_per_step']:,.0f} | "
                  f"{device_run['gru_instructions_per_step'] / device_run['egru_instructions_per_step']:.1f}× |",
                  "", f"Test vectors on the emulated Cortex-M0 ({DEVICE_VECTORS} test recordings and 2 saturating "
                  f"sequences): `{device_run['check']}` (exit status {device_run['check_exit_status']})."]
    return "\n".join(lines) + "\n"


def _lower(points: float) -> str:
    return f"{abs(points):.1f} points {'lower' if points >= 0 else 'higher'}"


def targets(results: dict) -> str:
    """The issue's targets against the measured runs ("qat" the deployed model)."""
    runs = results["runs"]
    gru, emb, qat = runs["gru"], runs["float"], runs["qat"]
    float_gap = 100 * (gru["float_accuracy"] - emb["float_accuracy"])
    q15_gap = 100 * (emb["float_accuracy"] - qat["q15_accuracy"])
    ratio = gru["float32_bytes"] / qat["stored_bytes"]
    device_run = qat.get("cortex_m0")
    device_line = ("not measured (no Arm toolchain and QEMU)" if device_run is None else
                   f"`{device_run['check']}` on the emulated Cortex-M0")
    rows = [
        ("float embedded eGRU within 2 points of the float GRU",
         f"{_percent(emb['float_accuracy'])} against {_percent(gru['float_accuracy'])} ({_lower(float_gap)})",
         float_gap <= 2),
        ("3-bit Q15 model within 3 points of the float embedded eGRU",
         f"{_percent(qat['q15_accuracy'])} (engine), {_percent(qat['c_accuracy'])} (C) against "
         f"{_percent(emb['float_accuracy'])} ({_lower(q15_gap)})", q15_gap <= 3),
        ("exported model ≥ 8× smaller than the float32 GRU", f"{ratio:.1f}×", ratio >= 8),
        ("C = Python engine, zero mismatches",
         f"{qat['c_mismatches']} values differ on the host; {device_line}",
         qat["c_mismatches"] == 0 and (device_run is None or device_run["check_exit_status"] == 0)),
    ]
    lines = ["| target | measured | met |", "|---|---|---|"]
    lines += [f"| {target} | {measured} | {'yes' if met else 'no'} |" for target, measured, met in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="print the tables of this JSON file")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
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
            entry["q15_classes_unlike_float"] = int((q_classes != float_classes).sum())
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
    print(markdown(results))


if __name__ == "__main__":
    main()
