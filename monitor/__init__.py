"""What a run reports: CLU writers, step timing, input wait, FLOPs and MFU, memory.

`monitor.flops` turns the model's own FLOP count (its `forward_flops`, the MFU
numerator; XLA's cost analysis is the cross-check and the fallback) into TFLOP/s
and MFU; `monitor.hardware` gives each device's peak FLOP/s (a table
for accelerators, a measured, cached matmul peak on CPU) and memory in use.
"""
