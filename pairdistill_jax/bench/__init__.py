"""Performance measurement: `--mode=benchmark`.

  flops.py    analytic model FLOPs of the train step and of corpus encoding
  hlo.py      the collectives of a compiled program (op, count, bytes, what they move)
  measure.py  timing statistics, chip peaks and MFU, device memory, the JSON record
  modes.py    the train-step, encoding and scaling benchmarks and the variants table (what --mode=benchmark runs)
"""
