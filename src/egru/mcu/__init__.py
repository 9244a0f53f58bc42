"""The embedded eGRU of Amoh & Odame (2019) for microcontrollers (SPEC §5).

A different cell from :class:`egru.EGRU`, with no events: one softsign update gate, no reset
gate, weights quantised to ``{0, ±¼, ±½, ±1}`` so that a multiplication is a shift, meant for
fixed-point inference on small devices. Named ``EmbeddedGRU`` so that it cannot be mistaken for
the event-based EGRU.

* :mod:`.functional`: the cell's equations and the 3-bit weight quantiser, written once.
* :mod:`.modules`: :class:`EmbeddedGRUCell` and the stacked :class:`EmbeddedGRU` (the
  ``torch.nn.GRU`` calling conventions), in float, optionally quantisation-aware.
* :mod:`.q15`: the same layers in Q15 fixed point with shifts for weights (numpy), and a dense
  head with int16 weights (:class:`.q15.Q15Classifier`): the
  bit-exact statement of what a device computes, and the converter from a float model.
* :mod:`.export`: :func:`export_c` writes that engine as a self-contained C99 library,
  :func:`write_test_vectors` inputs with the engine's outputs and a program that checks them.
* :mod:`.egru_q15` and :mod:`.egru_export`: the event-based :class:`egru.EGRU` itself (not the
  embedded eGRU) in fixed point, :class:`EGRUQ15` converted from a trained module with an
  optional linear readout, and :func:`export_egru_c`, an event-driven C99 library whose
  recurrent products add only the weight columns of units that fired, with
  :func:`write_egru_test_vectors`.
* :mod:`.device` (optional, imported on its own): the export built for a Cortex-M0+ and run on
  QEMU's emulated Cortex-M0, with instruction counts.

Keyword spotting with it: ``egru train classify --task fsdd --model embedded`` and
``egru export-c`` (docs/mcu.md).
"""

from .egru_export import export_egru_c, write_egru_test_vectors
from .egru_q15 import EGRUQ15
from .export import export_c, write_test_vectors
from .functional import QUANTIZERS, dequantize, quantization_codes, quantize, softsign
from .modules import EmbeddedGRU, EmbeddedGRUCell

__all__ = ["EGRUQ15", "EmbeddedGRU", "EmbeddedGRUCell", "QUANTIZERS", "dequantize", "export_c", "export_egru_c",
           "quantization_codes", "quantize", "softsign", "write_egru_test_vectors", "write_test_vectors"]
