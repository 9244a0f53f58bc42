"""The event-based EGRU on a microcontroller: float against fixed-point accuracy, the exported C
against the Python engine, multiply-accumulates per step with events against the same model
computed densely and, with the Arm toolchain and QEMU (scripts/install-arm-toolchain.sh), flash,
RAM and instructions per step on an emulated Cortex-M0, event-driven and dense.

    python benchmarks/mcu_egru.py --run mnist1d=RUNS/demo/egru --run fsdd=RUNS/fsdd --out docs/mcu-egru.json
    python benchmarks/mcu_egru.py --markdown docs/mcu-egru.json

Each ``--run NAME=DIR`` is a run of ``egru train classify --model egru`` (``egru demo --run-dir``
keeps its EGRU in ``DIR/egru``); docs/mcu.md has the commands. The engine's inputs are scaled by
the training split's largest value (:func:`egru.recipes.classify.input_exponent`), as
``egru export-c`` does.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from mcu import host_c

from egru.mcu import device, export_egru_c, q15, write_egru_test_vectors
from egru.recipes import classify

HOST_VECTORS = 50  # test sequences checked by the C on this machine (and 2 saturating ones)
DEVICE_VECTORS = 4  # test sequences checked on the emulated board (its 256 KiB of flash holds them)
COUNTED_SEQUENCES = 1  # whole test sequences whose instructions are counted (QEMU logs every instruction)
CHUNK = 250  # sequences the numpy engine runs at once


def engine_numbers(engine, inputs: np.ndarray) -> dict:
    """Run the engine over Q15 ``inputs`` (N, T, I): its classes and its events and MACs per
    step, averaged over every step of every sequence."""
    classes, activity = [], []
    per_layer = {"input": np.zeros(len(engine.layers)), "recurrent": np.zeros(len(engine.layers))}
    steps = inputs.shape[0] * inputs.shape[1]
    for start in range(0, len(inputs), CHUNK):
        run = engine.run(inputs[start:start + CHUNK].transpose(1, 0, 2))
        classes.append(run.logits[-1].argmax(axis=1))
        activity.append(np.array([e.sum(axis=(0, 1)).sum() for e in run.events], dtype=np.float64))
        for part in per_layer:
            per_layer[part] += getattr(run.macs, part).sum(axis=(1, 2))
    activity = np.sum(activity, axis=0) / (steps * np.array(engine.layer_sizes))
    dense = {"input": [3 * l.hidden_size * l.input_size for l in engine.layers],
             "recurrent": [3 * l.hidden_size * l.hidden_size for l in engine.layers]}
    macs = {part: (total / steps).tolist() for part, total in per_layer.items()}
    event_step = sum(map(sum, macs.values())) + engine.hidden_size  # the trace: one per unit
    dense_step = sum(map(sum, dense.values())) + engine.hidden_size
    return {"classes": np.concatenate(classes), "activity": activity.tolist(),
            "macs_per_step": macs, "dense_macs_per_step": dense,
            "recurrent_ratio": sum(macs["recurrent"]) / sum(dense["recurrent"]),
            "step_ratio": event_step / dense_step, "event_macs_per_step": event_step,
            "dense_step_macs": dense_step, "readout_macs": engine.classes * engine.hidden_size}


def steps_program(engine, sequences: np.ndarray, folder: Path) -> Path:
    """A main that runs -DSEQUENCES of the Q15 ``sequences`` (S, T, I), each from the reset state,
    through the exported model (its state static, so that RAM shows it), then classifies once."""
    S, T, I = sequences.shape
    values = ",\n".join("{" + ", ".join("{" + ", ".join(str(int(v)) for v in frame) + "}" for frame in seq) + "}"
                        for seq in sequences)
    source = folder / "steps.c"
    source.write_text(f"""#include "kws.h"
static const int16_t frames[{S}][{T}][KWS_INPUT] = {{
{values}}};
static volatile int sequences = SEQUENCES; /* volatile: the same code for every count */
static kws_state state;
int main(void) {{
    int32_t logits[KWS_CLASSES];
    int s, t;
    kws_reset(&state);
    for (s = 0; s < sequences; s++) {{
        kws_reset(&state);
        for (t = 0; t < {T}; t++) kws_step(frames[s][t], &state);
    }}
    return kws_classify(&state, logits) > 99;
}}
""")
    return source


def on_device(engine, inputs: np.ndarray, folder: Path) -> dict:
    """Build for the Cortex-M0+, check test vectors under QEMU, count the instructions of whole
    sequences with events and densely (``-DEGRU_DENSE``), and the program's flash and RAM."""
    export_egru_c(engine, folder, "kws")
    write_egru_test_vectors(engine, inputs[:DEVICE_VECTORS + 2], folder, "kws")
    elf = device.build([folder / "kws.c", folder / "kws_check.c"], folder / "check.elf")
    status, printed = device.run(elf, timeout=600)
    report = {"check_exit_status": status, "check": printed.strip().splitlines()[-1]}
    counted = inputs[:COUNTED_SEQUENCES]
    source = steps_program(engine, counted, folder)
    frames_bytes = 2 * counted.size
    for mode, defines in (("events", {}), ("dense", {"EGRU_DENSE": 1})):
        counts = {}
        for n in (0, COUNTED_SEQUENCES):
            elf = device.build([folder / "kws.c", source], folder / f"{mode}{n}.elf", {"SEQUENCES": n, **defines})
            counts[n] = device.count_instructions(elf, timeout=1800)
        sizes = device.size(folder / f"{mode}{COUNTED_SEQUENCES}.elf")
        report[mode] = {"instructions_per_step": (counts[COUNTED_SEQUENCES] - counts[0]) / counted.shape[0] / counted.shape[1],
                        "flash": sizes["text"] + sizes["data"] - frames_bytes, "ram": sizes["data"] + sizes["bss"]}
    counted_run = engine_numbers(engine, counted)
    report["counted_event_macs_per_step"] = counted_run["event_macs_per_step"]
    report["counted_activity"] = counted_run["activity"]
    return report


def measure(name: str, run_dir: Path, data_dir) -> dict:
    cfg = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False)["config"]
    splits = classify.TASKS[cfg["task"]](data_dir=data_dir).splits
    (x_train, _), (x, y) = splits["train"], splits["test"]
    labels = y.numpy()
    model = classify.load_classifier(run_dir / "best.pt")
    with torch.no_grad():
        float_classes = np.concatenate([model(x[i:i + 500].transpose(0, 1))[0].argmax(-1).numpy()
                                        for i in range(0, len(x), 500)])
    engine = classify.to_q15(model, classify.input_exponent(x_train))
    inputs = classify.fixed_point_inputs(engine, x)
    numbers = engine_numbers(engine, inputs)
    q_classes = numbers.pop("classes")
    entry = {"task": cfg["task"], "layer_sizes": engine.layer_sizes, "input_size": engine.input_size,
             "classes": engine.classes, "steps": int(x.shape[1]), "input_exponent": engine.input_exponent,
             "test_sequences": len(labels), "float_accuracy": float((float_classes == labels).mean()),
             "fixed_accuracy": float((q_classes == labels).mean()),
             "fixed_classes_unlike_float": int((q_classes != float_classes).sum()),
             "stored_bytes": engine.stored_bytes, **numbers}
    saturating = np.random.default_rng(0).choice(q15.INT16, size=(2,) + inputs.shape[1:])
    checked = np.concatenate([inputs[:HOST_VECTORS], saturating])
    for mode, flags in (("events", ()), ("dense", ("-DEGRU_DENSE",))):
        with tempfile.TemporaryDirectory() as scratch:
            mismatches, c_classes = host_c(engine, checked, Path(scratch), export_egru_c, write_egru_test_vectors,
                                           flags)
        entry[f"c_{mode}_mismatches"] = mismatches
        entry[f"c_{mode}_equals_engine_classes"] = bool(np.array_equal(c_classes[:HOST_VECTORS],
                                                                       q_classes[:HOST_VECTORS]))
    if device.available():
        with tempfile.TemporaryDirectory() as scratch:
            entry["cortex_m0"] = on_device(engine, inputs, Path(scratch))
    return entry


def _percent(value) -> str:
    return f"{value:.1%}"


def markdown(results: dict) -> str:
    lines = ["| model | test sequences | float | fixed point (Python engine) | classified unlike float "
             "| C = engine (host, events / dense) |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        same = (f"{r['c_events_mismatches']} / {r['c_dense_mismatches']} values differ "
                f"({HOST_VECTORS} + 2 saturating sequences)")
        lines.append(f"| {name}: EGRU {r['input_size']} → {' → '.join(map(str, r['layer_sizes']))} → {r['classes']} "
                     f"| {r['test_sequences']:,} | {_percent(r['float_accuracy'])} | {_percent(r['fixed_accuracy'])} | "
                     f"{r['fixed_classes_unlike_float']} | {same} |")
    lines += ["", "Per step, averaged over every step of the test set (the readout, applied once per sequence, "
              "is left out):", "",
              "| model | activity sparsity per layer | recurrent MACs: events / dense | step MACs: events / dense "
              "| model bytes |", "|---|---|---|---|---|"]
    for name, r in results.items():
        rec, dense_rec = sum(r["macs_per_step"]["recurrent"]), sum(r["dense_macs_per_step"]["recurrent"])
        sparsity = ", ".join(_percent(1 - a) for a in r["activity"])
        lines.append(f"| {name} | {sparsity} | {rec:,.0f} / {dense_rec:,} ({r['recurrent_ratio']:.3f}) | "
                     f"{r['event_macs_per_step']:,.0f} / {r['dense_step_macs']:,} ({r['step_ratio']:.3f}) | "
                     f"{r['stored_bytes']:,} |")
    devices = {name: r["cortex_m0"] for name, r in results.items() if "cortex_m0" in r}
    if devices:
        counted = "test sequence" if COUNTED_SEQUENCES == 1 else f"{COUNTED_SEQUENCES} test sequences"
        lines += ["", f"On the emulated Cortex-M0 (QEMU; `-mcpu=cortex-m0plus -Os`), the first {counted}, every "
                  "step, from the reset state:", "",
                  "| model | activity sparsity (counted) | instructions per step: events / dense | ratio "
                  "| flash bytes: events / dense | RAM bytes | test vectors on the device |",
                  "|---|---|---|---|---|---|---|"]
        for name, d in devices.items():
            e, n = d["events"], d["dense"]
            sparsity = ", ".join(_percent(1 - a) for a in d["counted_activity"])
            lines.append(f"| {name} | {sparsity} | {e['instructions_per_step']:,.0f} / {n['instructions_per_step']:,.0f} "
                         f"| {e['instructions_per_step'] / n['instructions_per_step']:.3f} | "
                         f"{e['flash']:,} / {n['flash']:,} | {e['ram']:,} | `{d['check']}` |")
    return "\n".join(lines) + "\n"


def targets(results: dict) -> str:
    """The work's targets against the measured runs."""
    rows = []
    for name, r in results.items():
        gap = 100 * (r["float_accuracy"] - r["fixed_accuracy"])
        rows.append((f"{name}: fixed point within 1 point of float",
                     f"{_percent(r['fixed_accuracy'])} against {_percent(r['float_accuracy'])} "
                     f"({abs(gap):.1f} points {'lower' if gap >= 0 else 'higher'})", gap <= 1))
    for name, r in results.items():
        device_run = r.get("cortex_m0")
        on_device = ("; not run on a device (no Arm toolchain and QEMU)" if device_run is None else
                     f"; `{device_run['check']}` on the emulated Cortex-M0")
        met = r["c_events_mismatches"] == 0 == r["c_dense_mismatches"] and (
            device_run is None or device_run["check_exit_status"] == 0)
        rows.append((f"{name}: C = Python engine, zero mismatches",
                     f"{r['c_events_mismatches']} (events) and {r['c_dense_mismatches']} (dense) values differ on the "
                     f"host{on_device}", met))
    for name, r in results.items():
        sparsity = 1 - float(np.mean(r["activity"]))
        measured = f"recurrent MACs {r['recurrent_ratio']:.3f} of dense at {_percent(sparsity)} activity sparsity"
        device_run = r.get("cortex_m0")
        if device_run:
            ratio = device_run["events"]["instructions_per_step"] / device_run["dense"]["instructions_per_step"]
            measured += f"; whole step {ratio:.3f} of dense in instructions"
        rows.append((f"{name}: at ~90 % activity sparsity the recurrent part ≤ 1/5 of the dense step",
                     measured, r["recurrent_ratio"] <= 0.2))
    lines = ["| target | measured | met |", "|---|---|---|"]
    lines += [f"| {target} | {measured} | {'yes' if met else 'no'} |" for target, measured, met in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="print the tables of this JSON file")
    args = parser.parse_args()
    if args.markdown:
        results = json.loads(args.markdown.read_text())
        print(targets(results) + "\n" + markdown(results))
        return
    results = {}
    for spec in args.run:
        name, _, folder = spec.partition("=")
        results[name] = measure(name, Path(folder), args.data_dir)
        print(name, json.dumps(results[name], indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(targets(results) + "\n" + markdown(results))


if __name__ == "__main__":
    main()
