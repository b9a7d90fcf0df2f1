"""What a run reports: CLU writers, step timing, input wait, FLOPs and MFU, memory.

`monitor.flops` counts model FLOPs analytically per model family (the MFU
numerator; XLA's cost analysis is the cross-check) and holds the TFLOP/s and
MFU arithmetic; `monitor.hardware` gives each device's peak FLOP/s (a table
for accelerators, a measured, cached matmul peak on CPU) and memory in use.
"""
